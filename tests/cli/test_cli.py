"""train.py through the real LightningCLI: fast_dev_run, configs, the dissection callback, DDP."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lwta_vision.cli import cli_main
from wandb_records import history_keys, records

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
TINY = [
    "--data.init_args.num_train", "256", "--data.init_args.num_val", "128", "--data.init_args.num_test", "64",
    "--data.init_args.batch_size", "64", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]


def _logger_args(tmp_path, name="t"):
    return ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", name,
            "--trainer.default_root_dir", str(tmp_path)]


def test_fast_dev_run_quickstart(tmp_path):
    cli = cli_main(["fit", "--config", QUICK, "--trainer.fast_dev_run", "2", *TINY, *_logger_args(tmp_path)])
    assert cli.trainer.state.finished
    assert cli.model.hparams.num_classes == 6  # linked from the datamodule
    assert cli.model.class_names[0] == "circle"


def test_fit_with_dissection_callback_logs_csv_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = ["fit", "--config", QUICK, *TINY, "--trainer.max_epochs", "2",
            "--trainer.limit_train_batches", "2", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks.init_args.max_probe_images", "128",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "csv",
            "--trainer.logger+=lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.project", "t",
            "--trainer.logger.init_args.offline", "true"]
    cli_main(args)
    import wandb

    wandb.finish()
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/version_*/metrics.csv")))))
    keys = set().union(*[{k for k, v in r.items() if v} for r in rows])
    for layer in ("layer3", "fc"):
        assert {f"dissect/{layer}/unique_labels", f"dissect/{layer}/mean_score",
                f"dissect/{layer}/active_fraction", f"dissect/{layer}/label_drift",
                f"dissect/{layer}/label_corr", f"dissect/{layer}/label_auprc"} <= keys
    # the label table as CSV in the run folder, every epoch
    tables = sorted(tmp_path.glob("**/dissection/epoch_*/fc.csv"))
    assert len(tables) == 2
    header = next(csv.reader(open(tables[0])))
    assert header[:4] == ["layer", "unit", "label", "score"]
    assert {"label_corr", "label_auprc", "label_base_rate"} <= set(header)
    # wandb offline: the run file holds the same metric keys, and the label tables were logged as media
    runs = list(tmp_path.glob("**/wandb/offline-run-*/run-*.wandb"))
    assert runs, "no offline wandb run"
    logged = history_keys(runs[0])
    assert {"dissect/fc/unique_labels", "dissect/layer3/label_drift", "dissect/layer3/active_fraction",
            "dissect/layer3/label_auprc", "val/acc"} <= logged
    tables = list(runs[0].parent.glob("files/media/table/dissect/fc/labels_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["layer", "unit", "label"] and len(table["data"]) == 6
    # callback state (previous labels, for drift) goes into the checkpoint
    ckpt = torch.load(next(tmp_path.glob("**/checkpoints/last.ckpt")), weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "NeuronDissection" in k)
    assert len(state["previous_labels"]["fc"]) == 6


def test_ddp_two_processes_through_train_py(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", QUICK, *TINY,
           "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
           "--trainer.callbacks.init_args.max_probe_images", "64", *_logger_args(tmp_path, "ddp")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(next(tmp_path.glob("ddp/version_*/metrics.csv")))))
    assert any(r.get("val/acc") for r in rows)
    assert any(r.get("dissect/fc/unique_labels") for r in rows)


def test_validate_test_predict_from_a_checkpoint(tmp_path):
    base = ["--config", QUICK, *TINY, *_logger_args(tmp_path), "--trainer.callbacks", "[]"]
    cli_main(["fit", *base, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    ckpt = str(next(tmp_path.glob("**/checkpoints/last.ckpt")))
    for sub in ("validate", "test", "predict"):
        cli = cli_main([sub, *base, "--ckpt_path", ckpt])
        assert cli.trainer.state.finished
    preds = cli.trainer.predict_loop.predictions
    assert torch.allclose(torch.cat(preds).sum(1), torch.ones(64), atol=1e-5)


def test_readme_wandb_command_twice_gives_two_standalone_runs(tmp_path, monkeypatch, capsys):
    """`train.py fit --config configs/quickstart.yaml --config configs/logger/wandb.yaml`, offline, twice: each
    run has its own folder (config.yaml, checkpoints/, dissection/), its wandb folder holds the label tables and
    the highlighted top images, and dissect.py works on either checkpoint, with or without config.yaml."""
    import wandb

    from lwta_vision.dissect_cli import main as dissect_main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", QUICK, "--config", str(ROOT / "configs" / "logger" / "wandb.yaml"), *TINY,
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.callbacks.init_args.max_probe_images", "128",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.default_root_dir",
            str(tmp_path / "runs")]
    folders = []
    for _ in range(2):
        cli_main(args)
        wandb.finish()
        folders.append(Path(capsys.readouterr().out.split("run folder: ")[1].split(" (")[0]))
    assert folders[0] != folders[1] and all(f.parent == tmp_path / "runs" / "lwta_vision" for f in folders)
    first_config = (folders[0] / "config.yaml").read_text()
    for f in folders:
        assert (f / "config.yaml").is_file() and (f / "checkpoints" / "last.ckpt").is_file()
        assert (f / "dissection" / "epoch_000" / "fc.csv").is_file()
        # the wandb run folder (named after the same id) stands alone: tables and images inside it
        run = next((tmp_path / "runs" / "wandb").glob(f"offline-run-*-{f.name}"))
        assert list(run.glob("files/media/table/dissect/layer3/labels_*.table.json"))
        images = list(run.glob("files/media/images/dissect/layer3/top_images_*.png"))
        active = sum(r["active"] == "True" for r in csv.DictReader(open(f / "dissection" / "epoch_000" / "layer3.csv")))
        assert 0 < len(images) <= active  # one strip per active unit (identical strips are stored once)
        assert any(b"max_probe_images" in r for r in records(next(run.glob("run-*.wandb"))))  # the whole CLI config
    assert (folders[0] / "config.yaml").read_text() == first_config  # the second run left the first alone
    assert not (tmp_path / "runs" / "config.yaml").exists() and not (tmp_path / "runs" / "dissection").exists()
    ckpt = folders[1] / "checkpoints" / "last.ckpt"
    with_config = dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null"])
    # without config.yaml the checkpoint's recorded datamodule rebuilds the same probe set (32 px)
    (folders[1] / "config.yaml").unlink()
    without = dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null"])
    assert without["probe"] == with_config["probe"] and without["labels"] == with_config["labels"]
    # a checkpoint that records no datamodule and has no config.yaml: the error says what was looked for
    old = torch.load(ckpt, weights_only=False)
    del old["datamodule"]
    bare = tmp_path / "bare" / "last.ckpt"
    bare.parent.mkdir()
    torch.save(old, bare)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        dissect_main(["evaluate", "--checkpoint", str(bare), "--device", "cpu", "--sentence_model", "null"])
    err = capsys.readouterr().err
    assert "no config.yaml in" in err and "the checkpoint records no datamodule" in err and "--data" in err
    # --data with other settings than the recorded ones is said, not silently used
    dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null",
                  "--data", "lwta_vision.data.ConceptDataModule", "--max_images", "64"])
    assert "image_size: trained with 32, given 64" in capsys.readouterr().err


def test_clip_precision_auto_is_full_precision_on_a_cpu_and_names_the_choices():
    import torch

    from lwta_vision.dissect_cli.loading import resolve_clip_precision

    assert resolve_clip_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_clip_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="auto, fp32, fp16, bf16"):
        resolve_clip_precision("half", torch.device("cpu"))
