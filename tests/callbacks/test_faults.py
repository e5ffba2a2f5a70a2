"""Kill train.py anywhere and resume: the run ends bit-identical to an uninterrupted one, and no checkpoint on
disk is corrupt.

Three SIGKILLs at seeded random steps, one of them halfway through writing a checkpoint file; each time the run
resumes with ``--ckpt_path`` from its newest step checkpoint. Mid-epoch resume is exact because the training
loader is a torchdata StatefulDataLoader whose sampler order depends only on (seed, epoch) and whose position
Lightning stores in every checkpoint, and the RNG states travel with it (RNGStateCheckpoint).
"""
import csv
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import torch

from lwta_vision.checkpoints import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL_NET = '{"widths": [8, 16, 32]}'  # LWTA U=4 as in the quickstart config
STEPS = 12  # 3 epochs x 4 batches


def _train(tmp: Path, name: str, steps_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "--data.init_args.num_train", "64", "--data.init_args.num_val", "32", "--data.init_args.batch_size", "16",
           "--trainer.max_epochs", "3", "--model.init_args.model_kwargs", SMALL_NET,
           "--trainer.callbacks.init_args.max_probe_images", "32", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
           "--trainer.logger.init_args.save_dir", str(tmp), "--trainer.logger.init_args.name", name,
           "--trainer.default_root_dir", str(tmp),
           "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
           "--trainer.callbacks.dirpath", str(steps_dir), "--trainer.callbacks.every_n_train_steps", "1",
           "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.filename", "{step}", *extra]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def _newest_step(steps_dir: Path) -> Path:
    return max(steps_dir.glob("step=*.ckpt"), key=lambda p: int(re.search(r"step=(\d+)", p.name).group(1)))


def _final_val_acc(tmp: Path, name: str) -> str:
    rows = [r for f in sorted(tmp.glob(f"{name}/version_*/metrics.csv")) for r in csv.DictReader(open(f))]
    return [r["val/acc"] for r in rows if r.get("val/acc")][-1]


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    full = _train(tmp_path, "full", tmp_path / "full_steps")
    assert full.returncode == 0, full.stderr[-3000:]

    kills = sorted(random.Random(0).sample(range(2, STEPS - 1), 3))  # seeded "random" steps
    phases = ["batch", "save", "batch"]
    steps_dir = tmp_path / "killed_steps"
    resume: list[str] = []
    for step, phase in zip(kills, phases):
        proc = _train(tmp_path, "killed", steps_dir, *resume, "--trainer.callbacks+=faults.KillAt",
                      "--trainer.callbacks.step", str(step), "--trainer.callbacks.phase", phase)
        assert proc.returncode == -9, (step, phase, proc.returncode, proc.stderr[-2000:])
        if phase == "save":  # killed halfway through writing step=<step>.ckpt: no such (partial) checkpoint
            assert not (steps_dir / f"step={step}.ckpt").exists()
        resume = ["--ckpt_path", str(_newest_step(steps_dir))]
    done = _train(tmp_path, "killed", steps_dir, *resume)
    assert done.returncode == 0, done.stderr[-3000:]

    a = read_checkpoint(tmp_path / "full_steps" / f"step={STEPS}.ckpt")
    b = read_checkpoint(steps_dir / f"step={STEPS}.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert _final_val_acc(tmp_path, "full") == _final_val_acc(tmp_path, "killed")
    # every checkpoint left on disk reads back whole
    for ckpt in tmp_path.rglob("*.ckpt"):
        read_checkpoint(ckpt)
