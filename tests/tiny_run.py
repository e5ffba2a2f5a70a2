"""A tiny quickstart run as a pytest fixture: ``trained_run`` is its ``last.ckpt`` (config.yaml beside it)."""
from pathlib import Path

import pytest

from lwta_vision.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny quickstart run (1 epoch on 256 images) with its checkpoint and saved config.yaml."""
    tmp = tmp_path_factory.mktemp("run")
    cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--data.init_args.num_train", "256", "--data.init_args.num_val", "96",
              "--data.init_args.batch_size", "32", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
              "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
              "--trainer.logger.init_args.save_dir", str(tmp), "--trainer.default_root_dir", str(tmp)])
    return next(tmp.glob("**/checkpoints/last.ckpt"))
