"""Resuming train.py with --ckpt_path after a crash: what is exact and what is not.

A tiny quickstart run (2 epochs x 2 batches, num_workers 0, seed 0) crashes in the middle of epoch 1
(an exception after global step 3) with step checkpoints being written, and is resumed with --ckpt_path.

- From an **epoch-boundary** checkpoint (the one written after epoch 0's validation) the resumed run ends with
  exactly the same weights, val/acc and dissection history as the uninterrupted run, *provided the RNG states
  travel with the checkpoint* (``RNGStateCheckpoint``, on by default in train.py). Lightning does not save them: without it the resumed run
  draws its epoch-1 shuffle and its LWTA Gumbel noise from a freshly seeded stream and ends elsewhere.
- From a **mid-epoch** checkpoint (step 3 of 4) it is exact too: the training loader is a torchdata
  StatefulDataLoader whose sampler's order depends only on (seed, epoch) and whose position Lightning stores
  in the checkpoint, so the remaining steps see the same batches with the same RNG states. The
  NeuronDissection callback's state (previous labels, history) survives, so the resumed epoch logs
  ``label_drift`` against the labels of epoch 0. (Kills at any step, one mid-write: tests/callbacks/test_faults.py.)
"""
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lwta_vision.callbacks import NeuronDissection
from lwta_vision.cli import LwtaCLI, cli_main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
_INSTANTIATE_TRAINER = LwtaCLI._instantiate_trainer
SMALL_NET = '{"widths": [8, 16, 32]}'  # LWTA U=4 as in the quickstart config


class _Crash(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at_step:  # step=<at_step>.ckpt was written at the end of the last batch
            raise RuntimeError("simulated crash")


def _fit(tmp, name, monkeypatch, *extra_args, crash=None):
    """train.py fit through the real CLI, with step checkpoints, RNG states and an optional crash added."""
    extra = [ModelCheckpoint(dirpath=tmp / name / "steps", every_n_train_steps=1, save_top_k=-1,
                             filename="{step}")] + ([_Crash(crash)] if crash else [])
    monkeypatch.setattr(LwtaCLI, "_instantiate_trainer", lambda self, config, callbacks: _INSTANTIATE_TRAINER(
        self, config, list(callbacks) + extra))
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.init_args.num_train", "32",
            "--data.init_args.num_val", "32", "--data.init_args.batch_size", "16", "--trainer.max_epochs", "2",
            "--model.init_args.model_kwargs", SMALL_NET,
            "--trainer.callbacks.init_args.layers", "[layer3, fc]", "--trainer.callbacks.init_args.max_probe_images",
            "32", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger.init_args.save_dir", str(tmp),
            "--trainer.logger.init_args.name", name, "--trainer.default_root_dir", str(tmp), *extra_args]
    cli = cli_main(args)
    return cli, next(c for c in cli.trainer.callbacks if isinstance(c, NeuronDissection))


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_after_a_crash(tmp_path, monkeypatch):
    full, full_nd = _fit(tmp_path, "full", monkeypatch)
    assert full.trainer.global_step == 4

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path, "crashed", monkeypatch, crash=3)
    # the crashed run keeps its folder: it has checkpoints (only runs that fail before one are removed)
    epoch_ckpt = next((tmp_path / "crashed").glob("version_0/checkpoints/epoch000-*.ckpt"))
    step_ckpt = tmp_path / "crashed" / "steps" / "step=3.ckpt"
    assert step_ckpt.is_file()

    # epoch boundary: exact (weights, val/acc, labels, dissection history)
    resumed, resumed_nd = _fit(tmp_path, "from_epoch", monkeypatch, "--ckpt_path", str(epoch_ckpt))
    assert resumed.trainer.global_step == 4
    assert _same_weights(full, resumed)
    assert resumed.trainer.callback_metrics["val/acc"] == full.trainer.callback_metrics["val/acc"]
    assert resumed_nd.previous_labels == full_nd.previous_labels
    assert resumed_nd.history == full_nd.history

    # mid-epoch: exact too (the training loader is a StatefulDataLoader whose sampler order depends only on
    # (seed, epoch), and its position travels with the checkpoint)
    mid, mid_nd = _fit(tmp_path, "from_step", monkeypatch, "--ckpt_path", str(step_ckpt))
    assert mid.trainer.global_step == 4
    assert _same_weights(full, mid)
    assert mid.model.scheduler_factory is not None  # --ckpt_path used to drop the LR schedule (see LwtaCLI)
    assert mid.trainer.callback_metrics["val/acc"] == full.trainer.callback_metrics["val/acc"]
    assert mid_nd.history[0] == full_nd.history[0]  # epoch 0's dissection, restored from the checkpoint
    assert [h["epoch"] for h in mid_nd.history] == [0, 1]
    assert {"label_drift"} <= set(mid_nd.history[1]["fc"]) and {"label_drift"} <= set(mid_nd.history[1]["layer3"])
    assert set(mid_nd.previous_labels) == {"layer3", "fc"} and len(mid_nd.previous_labels["fc"]) == 6
