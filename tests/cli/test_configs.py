"""The shipped configs as a user composes them: recipes with activation, data and callback overlays; schedules
that follow --trainer.max_epochs; LWTA/baseline pairs that differ only in the activation; and Lightning's own
switches (EMA, checkpoint on exception, weights-only loading) from YAML through train.py."""
from pathlib import Path

import pytest
import torch
import yaml

from lwta_vision.cli import cli_main, main as train_main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TINY = ["--data.init_args.num_train", "128", "--data.init_args.num_val", "64", "--data.init_args.num_test", "32",
        "--data.init_args.batch_size", "32", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0"]
SMALL = ["--model.init_args.model_kwargs", '{"widths": [8, 16, 32]}']

# recipe -> (its baseline as written, the LWTA overlay of the comparison)
RECIPES = {
    "cifar10_resnet18.yaml": "act/lwta_u2.yaml",
    "cifar100_resnet18.yaml": "act/lwta_u2.yaml",
    "cifar10_vit_tiny.yaml": "act/lwta_u24.yaml",
    "fashion_mnist.yaml": "act/lwta_u4.yaml",
    "imagenet_resnet50.yaml": "act/lwta_u2.yaml",
    "imagenet_vit_small.yaml": "act/lwta_u24.yaml",
}
# every composition the README shows, and each overlay at least once
COMPOSED = [
    *([r] for r in RECIPES),
    *([r, o] for r, o in RECIPES.items()),
    ["quickstart.yaml"], ["quickstart.yaml", "act/relu.yaml"], ["planted.yaml"],
    ["imagenet_resnet50.yaml", "act/lwta_u2.yaml", "data/imagenet_streaming.yaml"],
    ["imagenet_vit_small.yaml", "act/relu.yaml", "data/imagenet_streaming.yaml"],
    ["fashion_mnist.yaml", "act/gelu.yaml"],
    ["quickstart.yaml", "callbacks/ema.yaml"], ["quickstart.yaml", "logger/wandb.yaml"],
]
EPOCHS = 7  # no shipped config trains for 7 epochs


def _config_args(files) -> list[str]:
    return [a for f in files for a in ("--config", str(CONFIGS / f))]


def test_every_config_file_is_composed_by_a_test():
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert shipped == {f for files in COMPOSED for f in files}


@pytest.mark.parametrize("files", COMPOSED, ids=["+".join(f) for f in COMPOSED])
def test_config_builds_and_its_schedule_ends_at_max_epochs(files, tmp_path):
    """--trainer.max_epochs N on any composition: the network builds, and the learning rate stepped once per
    epoch never rises after its warmup, reaches the schedule's end at epoch N, and is never stepped past it."""
    args = [*_config_args(files), "--trainer.max_epochs", str(EPOCHS), "--trainer.default_root_dir", str(tmp_path)]
    if "logger/wandb.yaml" in files:  # built, never started: no run files
        args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    else:
        args += ["--trainer.logger", "false"]
    if not any(f.startswith(("quickstart", "planted")) for f in files):  # real datasets: nothing is read here
        args += ["--data.init_args.data_dir", "nowhere"]
    cli = cli_main(args, run=False)
    dm = cli.datamodule
    x = torch.randn(2, dm.in_channels, dm.image_size, dm.image_size)
    assert cli.model(x).shape == (2, dm.num_classes)

    conf = cli.model.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(EPOCHS):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # OneCycleLR raises when stepped past total_steps
    peak = lrs.index(max(lrs))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(lrs[peak:], lrs[peak + 1:])), lrs
    length = getattr(scheduler, "T_max", None) or getattr(scheduler, "total_steps", None)
    if length is not None:  # cosine / one-cycle: the whole schedule fits the run and ends at its last epoch
        assert length == EPOCHS
        assert lrs[-1] < 0.5 * max(lrs)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_lwta_and_baseline_differ_only_in_the_activation(recipe):
    """The comparison's two networks come from one recipe: resolved, they differ in the activation, its
    arguments and the run's name, nothing else."""
    configs = []
    for files in ([recipe], [recipe, RECIPES[recipe]]):
        cli = cli_main([*_config_args(files), "--data.init_args.data_dir", "nowhere"], run=False)
        configs.append(_flat(cli.config.as_dict()))
    baseline, lwta = configs
    differ = {k for k in baseline.keys() | lwta.keys() if baseline.get(k) != lwta.get(k)}
    lwta_only = {k for k in differ if k.startswith("model.init_args.act_kwargs.")}  # LWTA's own arguments
    assert differ - lwta_only == {"model.init_args.act", "trainer.logger.init_args.name"}
    assert lwta_only and baseline["model.init_args.act_kwargs"] is None
    assert baseline["model.init_args.act"] in ("relu", "gelu") and lwta["model.init_args.act"] == "lwta"
    assert lwta["trainer.logger.init_args.name"] == baseline["trainer.logger.init_args.name"].replace(
        baseline["model.init_args.act"], "lwta")


def _fit(tmp_path, *extra, name="t", config=CONFIGS / "quickstart.yaml"):
    runs = str(tmp_path / "runs")
    return cli_main(["fit", "--config", str(config), *TINY, *SMALL,
                     "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
                     "--trainer.logger.init_args.name", name, *extra])


def test_a_run_saves_the_resolved_config_and_a_resume_keeps_its_schedule(tmp_path):
    """The run folder's config.yaml has the values used (T_max = max_epochs), so it reruns alone; resumed with
    a larger max_epochs, the schedule keeps the length it started with and a warning says so."""
    cli = _fit(tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
               "--trainer.callbacks", "[]")
    run = Path(cli.trainer.log_dir)
    text = (run / "config.yaml").read_text()
    assert "${" not in text
    saved = yaml.safe_load(text)
    assert saved["model"]["init_args"]["lr_scheduler"]["init_args"]["T_max"] == 2
    assert saved["model"]["init_args"]["act"] == "lwta"
    assert cli.trainer.lr_scheduler_configs[0].scheduler.T_max == 2

    with pytest.warns(UserWarning, match=r"lasts 2 epochs but trainer.max_epochs is 3, so it does not end at the last epoch \(a resumed"):
        again = _fit(tmp_path, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
                     "--trainer.callbacks", "[]", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), name="r")
    assert again.trainer.lr_scheduler_configs[0].scheduler.T_max == 2


def test_ema_from_yaml_validates_dissects_and_checkpoints_the_averaged_weights(tmp_path, monkeypatch):
    from lwta_vision.callbacks import NeuronDissection
    from lightning.pytorch.callbacks import WeightAveraging

    seen = []
    original = NeuronDissection.on_validation_epoch_end

    def spy(self, trainer, pl_module):
        seen.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))
        return original(self, trainer, pl_module)

    monkeypatch.setattr(NeuronDissection, "on_validation_epoch_end", spy)
    cli = cli_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config",
                    str(CONFIGS / "callbacks" / "ema.yaml"), *TINY, *SMALL, "--ema.init_args.decay", "0.5",
                    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                    "--trainer.callbacks.init_args.max_probe_images", "64",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                    str(tmp_path)])
    callbacks = cli.trainer.callbacks
    ema = next(cb for cb in callbacks if isinstance(cb, WeightAveraging))
    assert callbacks.index(ema) > max(i for i, cb in enumerate(callbacks) if isinstance(cb, NeuronDissection))
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    names = [n for n, _ in cli.model.named_parameters()]
    flat = lambda sd: torch.cat([sd[n].flatten() for n in names])  # noqa: E731
    assert not torch.equal(flat(averaged), flat(raw))
    assert len(seen) == 1 and torch.equal(seen[0], flat(averaged))  # the dissection saw the average


def test_dissection_listed_after_weight_averaging_by_hand_is_refused(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    with pytest.raises(SystemExit):
        train_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *TINY, *SMALL,
                    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                    "--trainer.callbacks", "[lightning.pytorch.callbacks.EMAWeightAveraging]",
                    "--trainer.callbacks+=lwta_vision.callbacks.NeuronDissection",
                    "--trainer.callbacks.init_args.layers", "[fc]",
                    "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs])
    err = capsys.readouterr().err
    assert "error: EMAWeightAveraging comes before NeuronDissection in trainer.callbacks" in err


def test_checkpoint_on_exception_from_the_cli(tmp_path):
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        _fit(tmp_path, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
             "--trainer.callbacks", "[faults.RaiseAt]", "--trainer.callbacks.init_args.step", "3",
             "--checkpoint.save_on_exception", "true")
    saved = sorted(p.name for p in (tmp_path / "runs").rglob("*.ckpt"))
    assert "last.ckpt" in saved and len(saved) >= 2
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 3  # the state at the failure, not the epoch before it


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(_Boom.sentinel),))


def test_checkpoints_are_read_weights_only_by_every_subcommand(tmp_path, capsys):
    for sub in ("fit", "validate", "test", "predict"):
        with pytest.raises(SystemExit):
            cli_main([sub, "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["weights_only"] is True
    good = _fit(tmp_path, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                "--trainer.callbacks", "[]")
    ckpt = torch.load(Path(good.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    _Boom.sentinel = str(tmp_path / "pwned")
    ckpt["extra"] = _Boom()
    torch.save(ckpt, tmp_path / "evil.ckpt")
    runs = str(tmp_path / "runs2")
    with pytest.raises(SystemExit) as exc:
        train_main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *TINY, *SMALL, "--trainer.callbacks", "[]",
                    "--trainer.max_epochs", "2", "--ckpt_path", str(tmp_path / "evil.ckpt"),
                    "--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs])
    assert exc.value.code == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()  # the pickled call never ran
