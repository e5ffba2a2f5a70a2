"""LightningCLI for training: ``python train.py fit --config configs/quickstart.yaml``."""
from __future__ import annotations

import os
import sys
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lwta_vision.lit import LitClassifier

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


class LwtaCLI(LightningCLI):
    """Links the datamodule's ``num_classes``, ``in_channels`` and ``class_names`` into the model and adds an
    always-on ``checkpoint`` (ModelCheckpoint on ``val/acc``, configurable as ``--checkpoint.*``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        for attr in ("num_classes", "in_channels", "class_names"):
            parser.link_arguments(f"data.{attr}", f"model.init_args.{attr}", apply_on="instantiate")


def cli_main(args: Optional[list[str]] = None, run: bool = True) -> LwtaCLI:
    """Entry point used by train.py and by tests (``args`` as a list of strings)."""
    return LwtaCLI(
        LitClassifier,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )
