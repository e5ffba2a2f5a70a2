"""One folder per run, whatever the loggers: where its checkpoints, config.yaml and dissection/ go."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_dir(trainer: L.Trainer) -> Path:
    """The run's own folder: the parent of the ``checkpoints/`` folder Lightning's ModelCheckpoint picks.

    ``trainer.log_dir`` is the first logger's ``save_dir`` for loggers without a versioned folder (wandb:
    ``runs/``), so every wandb run would write its config and tables into the same place. ModelCheckpoint
    already gives each run ``<save_dir>/<name>/<version>`` (CSV and TensorBoard: their own log_dir; wandb:
    ``<save_dir>/<project>/<run id>``); this uses the same rule, broadcast from rank 0 (a collective under DDP:
    every rank must call it).
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        path = os.path.join(save_dir, str(logger.name), version)
    else:
        path = trainer.default_root_dir
    return Path(trainer.strategy.broadcast(str(path)))


class RunConfigCallback(SaveConfigCallback):
    """LightningCLI's config saver, writing ``config.yaml`` into :func:`run_dir` instead of ``trainer.log_dir``
    (so a second wandb run never overwrites the first run's config)."""

    folder = None
    created_folder = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_dir(trainer)
        if self.save_to_log_dir and trainer.is_global_zero:
            fs = get_filesystem(str(folder))
            # remembered so that a run failing before its first checkpoint can take its folder away again
            self.folder, self.created_folder = folder, not fs.exists(str(folder))
            fs.makedirs(str(folder), exist_ok=True)
            self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=True,
                             multifile=self.multifile)
            _note_lwta_implementation(fs, folder / self.config_filename, pl_module, trainer.strategy.root_device)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # the metrics on disk keep up with the checkpoints: a job killed right after one (a SLURM requeue after
        # its hpc checkpoint) loses no logged row
        for logger in trainer.loggers:
            if isinstance(logger, (CSVLogger, TensorBoardLogger)):
                logger.save()

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The whole run config (trainer, model, data, callbacks) in wandb's run config too."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"cli": _plain_config(self.config)}, allow_val_change=True)


def _note_lwta_implementation(fs, path: Path, pl_module: L.LightningModule, device) -> None:
    """A comment atop config.yaml naming the implementation that draws the LWTA noise (not a setting: the file
    still reruns the run with ``--config``; the same seed with another implementation trains another network)."""
    record = getattr(pl_module, "lwta_implementation", lambda device: None)(device)
    if record is None:
        return
    from lwta_vision.layers import describe_implementation

    with fs.open(str(path), "r") as f:
        text = f.read()
    note = (f"# LWTA noise drawn by: {describe_implementation(record)} (recorded by train.py; the checkpoints "
            f"hold it as lwta_implementation)\n")
    tmp = f"{path}.tmp"  # written beside it and moved over it: config.yaml is never left half written
    with fs.open(tmp, "w") as f:
        f.write(note + text)
    fs.mv(tmp, str(path))


def _plain_config(config) -> dict:
    """The jsonargparse namespace as plain dicts/lists/strings (wandb's config stores JSON)."""
    import json

    as_dict = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    return json.loads(json.dumps(as_dict, default=str))
