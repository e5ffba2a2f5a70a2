"""SLURM auto-requeue, end to end on a CPU: SIGUSR1 -> hpc checkpoint -> `scontrol requeue` -> the requeued job
resumes by itself in the same run folder, keeps every metrics.csv row, and ends as an uninterrupted job would.

The job runs train.py with the arguments of examples/slurm/train_multinode.sbatch (one task instead of 8) under
a simulated SLURM environment; a fake `scontrol` on PATH records the requeue and then kills the job, as SLURM
does.
"""
import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import torch

from lwta_vision.checkpoints import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SMALL_NET = '{"widths": [8, 16, 32]}'  # LWTA U=4 as in the quickstart config
NAME = "slurm_test"


def _job(tmp: Path, job_id: str, *extra: str) -> subprocess.CompletedProcess:
    bin_dir = tmp / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        fake = bin_dir / "scontrol"
        fake.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -9 $PPID\n')  # SLURM ends the job
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SCONTROL_LOG=str(tmp / "scontrol.log"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               SLURM_JOB_ID=job_id, SLURM_JOB_NAME="lwta-train", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
               SLURM_NNODES="1", SLURM_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
               SLURM_CPUS_PER_TASK="1")
    run_dir = f"runs/{NAME}/slurm-{job_id}"  # as the sbatch script sets it
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           "--data.init_args.num_train", "64", "--data.init_args.num_val", "32", "--data.init_args.batch_size", "16",
           "--trainer.max_epochs", "3", "--model.init_args.model_kwargs", SMALL_NET,
           "--trainer.callbacks.init_args.max_probe_images", "32", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
           "--trainer.log_every_n_steps", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
           "--trainer.default_root_dir", run_dir, "--trainer.logger.init_args.save_dir", "runs",
           "--trainer.logger.init_args.name", NAME, "--trainer.logger.init_args.version", f"slurm-{job_id}", *extra]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


def _rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def test_sigusr1_requeue_resume(tmp_path):
    full = _job(tmp_path, "5000")
    assert full.returncode == 0, full.stderr[-3000:]

    first = _job(tmp_path, "4242", "--trainer.callbacks+=faults.SignalAt", "--trainer.callbacks.step", "6")
    assert first.returncode == -9, first.stderr[-3000:]  # ended by the (fake) requeue
    run_dir = tmp_path / "runs" / NAME / "slurm-4242"
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert read_checkpoint(hpc)["global_step"] == 7  # saved at the end of the step the signal arrived in
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    before = _rows(run_dir)
    assert any(r.get("train/loss_step") for r in before) and any(r.get("val/acc") for r in before)

    requeued = _job(tmp_path, "4242")  # the same job id, the same command, no --ckpt_path
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in requeued.stdout + requeued.stderr  # Lightning restored it by itself
    after = _rows(run_dir)
    keys = list(before[0])  # the requeued job may add columns (the file is rewritten with the wider header)
    assert [{k: r.get(k, "") for k in keys} for r in after[: len(before)]] == before  # no row lost or changed
    assert len(after) > len(before)
    # and the requeued job ends where the uninterrupted one did
    a = read_checkpoint(next((tmp_path / "runs" / NAME / "slurm-5000" / "checkpoints").glob("last.ckpt")))
    b = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 12
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
