"""DDP correctness through train.py (CPU, gloo, 2 processes): labels, metrics and resume equal their
1-process / uninterrupted counterparts.

One 2-process run of 2 epochs (keeping every epoch's checkpoint) serves three checks:
- its epoch-0 dissection tables and val metrics equal a 1-process ``validate`` of its epoch-0 checkpoint (same
  weights, same probe set of 65 images: an odd count, so the shards are uneven);
- a 2-process run resumed from its epoch-0 checkpoint ends with bit-identical weights (per-rank RNG states);
- its ``last.ckpt`` is the last epoch, not the best one.

The SLURM and torchrun examples are checked here too: their train.py arguments parse and build.
"""
import csv
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from lwta_vision.cli import cli_main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
# 128 train images on 2 ranks: 2 steps per epoch; 65 val images: rank 0 gets 33 (2 batches), rank 1 32 (1)
DATA = ["--data.init_args.num_train", "128", "--data.init_args.num_val", "65", "--data.init_args.num_test", "32",
        "--data.init_args.batch_size", "32", "--trainer.callbacks.init_args.max_probe_images", "65",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
VAL_KEYS = ("val/acc", "val/acc_top5", "val/loss", "val/sparsity", "val/sparsity/layer3.act")


def _run_dir(tmp: Path, name: str) -> list[str]:
    return ["--trainer.logger.init_args.save_dir", str(tmp), "--trainer.logger.init_args.name", name,
            "--trainer.default_root_dir", str(tmp)]


def _train_py(tmp: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader(open(next(run.glob("version_*/metrics.csv")))))


def _val_row(run: Path, epoch: int) -> dict:
    return next(r for r in _rows(run) if r.get("val/acc") and int(r["epoch"]) == epoch)


def _tables(run: Path, epoch: int) -> dict[str, list[dict]]:
    folder = next(run.glob(f"version_*/dissection/epoch_{epoch:03d}"))
    return {layer: list(csv.DictReader(open(folder / f"{layer}.csv"))) for layer in ("layer3", "fc")}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-process, 2-epoch fit keeping every epoch's checkpoint."""
    tmp = tmp_path_factory.mktemp("ddp")
    _train_py(tmp, "fit", "--config", QUICK, *DATA, *DDP, "--trainer.max_epochs", "2", "--checkpoint.save_top_k",
              "-1", *_run_dir(tmp, "full"))
    return tmp


def test_two_processes_label_and_score_like_one(ddp_run, tmp_path):
    ckpt = next((ddp_run / "full").glob("version_0/checkpoints/epoch000-*.ckpt"))
    cli_main(["validate", "--config", QUICK, *DATA, *_run_dir(tmp_path, "one"), "--ckpt_path", str(ckpt)])
    one, two = _tables(tmp_path / "one", 0), _tables(ddp_run / "full", 0)
    for layer in ("layer3", "fc"):
        assert len(one[layer]) == len(two[layer]) > 0
        for a, b in zip(one[layer], two[layer]):
            # labels, top images (ties ordered by image id) and rates (summed counts) are exact
            for key in ("unit", "label", "label_2", "label_3", "active", "top_images", "win_rate", "input_rate"):
                assert a[key] == b[key], (layer, a["unit"], key, a[key], b[key])
            for key in ("score", "score_2", "score_3"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-6), (layer, a["unit"], key)
    # metrics over the full val set: 65 images, none counted twice, loss/sparsity weighted by the true counts
    one_val, two_val = _val_row(tmp_path / "one", 0), _val_row(ddp_run / "full", 0)
    for key in VAL_KEYS:
        assert float(one_val[key]) == pytest.approx(float(two_val[key]), rel=1e-6), key


def test_ddp_resume_continues_bit_identical(ddp_run):
    full = ddp_run / "full" / "version_0" / "checkpoints"
    ckpt0 = torch.load(next(full.glob("epoch000-*.ckpt")), weights_only=True)
    rng = next(v for k, v in ckpt0["callbacks"].items() if k.startswith("RNGStateCheckpoint"))
    assert rng["world_size"] == 2 and len(rng["ranks"]) == 2
    # the ranks draw different LWTA noise, so restoring the wrong rank's state would show below
    assert not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])

    _train_py(ddp_run, "fit", "--config", QUICK, *DATA, *DDP, "--trainer.max_epochs", "2",
              *_run_dir(ddp_run, "resumed"), "--ckpt_path", str(next(full.glob("epoch000-*.ckpt"))))
    last_full = torch.load(full / "last.ckpt", weights_only=True)
    last_resumed = torch.load(next((ddp_run / "resumed").glob("version_0/checkpoints/last.ckpt")), weights_only=True)
    assert ckpt0["global_step"] == 2 and last_resumed["global_step"] == last_full["global_step"] == 4
    assert last_resumed["epoch"] == last_full["epoch"] == 1  # last.ckpt is the last epoch, whatever val/acc did
    assert last_full["state_dict"].keys() == last_resumed["state_dict"].keys()
    for key, value in last_full["state_dict"].items():
        assert torch.equal(value, last_resumed["state_dict"][key]), key
    resumed_rows = _rows(ddp_run / "resumed")
    assert {int(r["epoch"]) for r in resumed_rows} == {1}  # only the remaining epoch ran
    assert float(_val_row(ddp_run / "resumed", 1)["val/acc"]) == float(_val_row(ddp_run / "full", 1)["val/acc"])


# -- the pieces, without processes ---------------------------------------------------------------------
def _fake_trainer(world: int, rank: int, use_distributed_sampler: bool = True):
    return SimpleNamespace(world_size=world, global_rank=rank,
                           _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler))


def test_eval_splits_are_sharded_without_repeats():
    from lwta_vision.data.base import unrepeated_eval_sampler

    data = list(range(65))
    shards = [list(unrepeated_eval_sampler(data, _fake_trainer(3, r))) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data  # every image once: no padding
    assert [len(s) for s in shards] == [22, 22, 21]
    assert unrepeated_eval_sampler(data, _fake_trainer(1, 0)) is None  # one process: Lightning's default
    assert unrepeated_eval_sampler(data, None) is None
    assert unrepeated_eval_sampler(data[:2], _fake_trainer(3, 0)) is None  # a rank would get no batch
    assert unrepeated_eval_sampler(data, _fake_trainer(2, 0, use_distributed_sampler=False)) is None


def test_top_k_ties_go_to_the_smaller_image_id_whatever_the_order():
    from lwta_vision.dissect.recording import merge_records, record_activations, top_k_by_value

    values = torch.tensor([[1.0], [0.0], [1.0], [0.0], [2.0], [1.0]])
    ids = torch.tensor([5, 4, 3, 2, 1, 0])
    v, i = top_k_by_value(values, ids, 4)
    assert v.flatten().tolist() == [2.0, 1.0, 1.0, 1.0] and i.flatten().tolist() == [1, 0, 3, 5]

    # a network whose pooled outputs tie a lot (LWTA losers are exactly 0): one pass, shuffled shards and
    # batch sizes all give the same top images
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten())
    x = torch.randn(40, 1, 2, 2)
    x[::3] = 0  # every third image blank: equal outputs, exact ties
    whole = record_activations(net, ["3"], _index_loader(x, range(40), 7), top_k=30)["3"]
    perm = torch.randperm(40).tolist()
    shards = [record_activations(net, ["3"], _index_loader(x, perm[r::2], 5), top_k=30)["3"] for r in range(2)]
    merged = merge_records(shards, 30)
    assert torch.equal(merged.top_indices, whole.top_indices)
    assert torch.equal(merged.win_rate, whole.win_rate) and torch.equal(merged.pooled, whole.pooled)


def _index_loader(x, indices, batch_size):
    indices = list(indices)
    ds = torch.utils.data.TensorDataset(x[indices], torch.tensor(indices))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def test_batch_weighted_mean_weights_by_images_and_shows_nan():
    from lwta_vision.lit.classifier import BatchWeightedMean

    m = BatchWeightedMean()
    m.update(torch.tensor(1.0), 32)
    m.update(0.5, 1)
    assert m.compute().item() == pytest.approx((32 * 1.0 + 0.5) / 33)
    m.update(float("nan"), 4)
    assert torch.isnan(m.compute())


def test_rng_states_restore_by_rank_and_warn_on_another_world_size():
    from lwta_vision.callbacks.rng import RNGStateCheckpoint

    cb = RNGStateCheckpoint()
    torch.manual_seed(1)
    s1 = cb.state_dict()
    torch.manual_seed(2)
    s2 = cb.state_dict()
    two_ranks = {"world_size": 2, "ranks": [s1["ranks"][0], s2["ranks"][0]]}
    cb._world_size, cb._rank = 2, 1
    cb.load_state_dict(two_ranks)  # rank 1 gets rank 1's state
    a = torch.rand(3)
    torch.manual_seed(2)
    assert torch.equal(a, torch.rand(3))
    cb._world_size, cb._rank = 1, 0
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match="holds the RNG states of 2 process"):
        cb.load_state_dict(two_ranks)
    b = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(b, torch.rand(3))  # untouched
    old = dict(s1["ranks"][0])  # the format of checkpoints written before per-rank states
    cb.load_state_dict(old)
    c = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(c, torch.rand(3))


def test_rank_streams_differ_and_rank_0_keeps_its_stream():
    from lwta_vision.callbacks.rng import RNGStateCheckpoint

    def draws(world, rank):
        torch.manual_seed(0)
        RNGStateCheckpoint().setup(SimpleNamespace(world_size=world, global_rank=rank), None, "fit")
        return torch.rand(4)

    assert torch.equal(draws(1, 0), draws(2, 0))
    assert not torch.equal(draws(2, 0), draws(2, 1))
    assert torch.equal(draws(2, 1), draws(4, 1))  # a function of (seed, rank) only


# -- the cluster examples cannot rot: their train.py arguments go through the CLI ------------------------------
SBATCH = ROOT / "examples" / "slurm" / "train_multinode.sbatch"
FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "8", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
              "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[01-02]", "SLURM_JOB_NAME": "lwta-train",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


def _sbatch_directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key.strip()] = value.strip()
    return out


def _srun_argv(text: str) -> list[str]:
    """The srun command line as the job's shell expands it (the script's variable assignments, SLURM's env)."""
    joined = text.replace("\\\n", " ")
    assignments = [ln for ln in joined.splitlines() if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", ln)]
    srun = [ln for ln in joined.splitlines() if ln.startswith("srun ")]
    assert len(srun) == 1, "the script should have exactly one srun line"
    program = "\n".join(['srun() { printf "%s\\0" "$@"; }', "set -u", *assignments, srun[0]])
    env = {"PATH": os.environ["PATH"], **FAKE_SLURM}
    out = subprocess.run(["bash", "-c", program], env=env, capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_slurm_example_arguments_build_a_slurm_trainer(tmp_path, monkeypatch, capsys):
    text = SBATCH.read_text()
    sbatch = _sbatch_directives(text)
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "4" and sbatch["gres"] == "gpu:4"
    assert sbatch["signal"] == "SIGUSR1@90" and "requeue" in sbatch and int(sbatch["cpus-per-task"]) > 0
    argv = _srun_argv(text)
    assert argv[:3] == ["python", "train.py", "fit"]
    args = argv[2:]
    opt = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
    assert opt["--trainer.num_nodes"] == sbatch["nodes"] and opt["--trainer.devices"] == sbatch["ntasks-per-node"]
    assert opt["--trainer.strategy"] == "ddp" and opt["--data.init_args.num_workers"] == "8"
    # the run folder survives a requeue: named after the job id, and the logger writes into it
    run_dir = Path(opt["--trainer.default_root_dir"])
    assert run_dir == Path(opt["--trainer.logger.init_args.save_dir"]) / opt["--trainer.logger.init_args.name"] \
        / opt["--trainer.logger.init_args.version"] and "4242" in run_dir.name
    assert (ROOT / opt["--config"]).is_file()

    # every argument is accepted by train.py's parser (names, types), as the script passes it
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["num_nodes"] == 2 and str(printed["trainer"]["devices"]) == "4"  # devices: int | str
    assert printed["data"]["init_args"]["batch_size"] == 32

    # and build: model, data and a Trainer that detects SLURM with matching nodes x tasks (only the GPU
    # accelerator and the output folders are swapped for this machine)
    for key, value in FAKE_SLURM.items():
        monkeypatch.setenv(key, value)
    local = [*args[1:], "--trainer.accelerator", "cpu",  # run=False: no subcommand "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
             "--trainer.default_root_dir", str(tmp_path / run_dir)]
    cli = cli_main(local, run=False)
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    env = cli.trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert cli.trainer.num_nodes == 2 and cli.trainer.num_devices == 4 and cli.trainer.world_size == 8
    assert cli.datamodule.batch_size == 32 and cli.model.hparams.model == "resnet50"


def test_readme_torchrun_commands_parse(monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Multi-GPU and clusters", 1)[1].split("\n## ", 1)[0]
    commands = [c for c in section.replace("\\\n", " ").splitlines() if c.startswith("torchrun ")]
    assert len(commands) == 2
    monkeypatch.chdir(ROOT)
    for command in commands:
        argv = shlex.split(command)
        args = argv[argv.index("train.py") + 1:]
        opt = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
        tr = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}
        assert opt["--trainer.devices"] == tr["--nproc_per_node"]
        assert opt.get("--trainer.num_nodes", "1") == tr.get("--nnodes", "1")
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*args, "--print_config"])
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["strategy"] == "ddp"


@pytest.mark.slow  # ~65 s (inductor compiles in both processes); compile and DDP each have fast tests in CI
def test_ddp_with_a_compiled_backbone_trains_dissects_and_checkpoints(ddp_run, tmp_path):
    # the default backend (inductor) in both processes; the uncompiled run of the fixture is the yardstick
    _train_py(tmp_path, "fit", "--config", QUICK, *DATA, *DDP, "--trainer.max_epochs", "1",
              "--model.init_args.compile", "true", *_run_dir(tmp_path, "compiled"))
    compiled, plain = _tables(tmp_path / "compiled", 0), _tables(ddp_run / "full", 0)
    assert {k: len(v) for k, v in compiled.items()} == {k: len(v) for k, v in plain.items()}
    row = _val_row(tmp_path / "compiled", 0)
    assert all(float(row[k]) == float(row[k]) for k in VAL_KEYS)  # logged and not NaN
    assert abs(float(row["val/loss"]) - float(_val_row(ddp_run / "full", 0)["val/loss"])) < 0.5
    ckpt = torch.load(next((tmp_path / "compiled").glob("version_0/checkpoints/last.ckpt")), weights_only=False)
    state = torch.load(next((ddp_run / "full").glob("version_0/checkpoints/last.ckpt")), weights_only=False)
    assert list(ckpt["state_dict"]) == list(state["state_dict"])  # the same keys as an uncompiled run
