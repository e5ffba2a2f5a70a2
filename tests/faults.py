"""Fault injection for tests that run train.py in a subprocess (importable with tests/ on PYTHONPATH)."""
import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """SIGKILL this process at global step ``step``: before the batch (``phase="batch"``), or halfway through
    writing that step's checkpoint file (``phase="save"``)."""

    def __init__(self, step: int, phase: str = "batch"):
        self.step, self.phase = step, phase

    def on_train_batch_start(self, trainer, *args):
        if self.phase == "batch" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.phase == "save" and trainer.global_step == self.step:
            from fsspec.implementations.local import LocalFileOpener

            real = LocalFileOpener.write

            def write_half_then_die(f, data):
                real(f, data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)

            LocalFileOpener.write = write_half_then_die



class SignalAt(Callback):
    """Send this process SIGUSR1 (SLURM's warning before the time limit) at global step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class RaiseAt(Callback):
    """Raise RuntimeError at global step ``step`` (a crash inside training, for checkpoint-on-exception)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")
