"""ModelCheckpoint whose ``last.ckpt`` is the latest epoch, whatever the monitored metric did."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class LastModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``save_last`` meaning "the latest state" again.

    Since Lightning 2.6, ``save_last=True`` writes ``last.ckpt`` only at a step where a top-k checkpoint was
    saved too: once ``val/acc`` stops improving, ``last.ckpt`` is a copy of the best checkpoint, and resuming
    from it (``--ckpt_path last.ckpt``, or a SLURM requeue) silently goes back to that epoch. This subclass also
    writes ``last.ckpt`` at every other save point (each validation end, or each training epoch end without
    validation), and writes nothing in ``fast_dev_run`` (Lightning 2.6 writes ``last.ckpt`` at the end of a
    fast_dev_run although it reports checkpointing as suppressed). Everything else, including the
    configuration keys, is ModelCheckpoint's.
    """

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written before this subclass restore its state (best score, paths)
        key = super().state_key
        return ModelCheckpoint.__qualname__ + key[len(type(self).__qualname__):]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_missed(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_missed(trainer, at_train_epoch_end=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def _save_last_if_missed(self, trainer, at_train_epoch_end: bool) -> None:
        # skipped when a checkpoint (top-k and last) was already written at this step, outside fit, in
        # fast_dev_run and in the sanity check
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        if self._should_save_on_train_epoch_end(trainer) != at_train_epoch_end:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
