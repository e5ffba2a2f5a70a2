"""LightningCLI for training: ``python train.py fit --config configs/quickstart.yaml``.

``cli_main(args)`` is the CLI itself (tests drive it with a list of strings and see the exceptions);
``main(args)`` is what train.py runs: the same, but a user-facing error (missing data, a wrong layer, a bad
checkpoint, a non-finite loss, ...) is one ``error: <message>`` line on stderr and exit code 2, with the
traceback only when ``LWTA_DEBUG=1``.
"""
from __future__ import annotations

import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Optional

from jsonargparse import set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

try:  # Lightning >= 2.6
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover - older Lightning: no weight averaging switch
    WeightAveraging = None

from lwta_vision.callbacks.checkpoint import LastModelCheckpoint
from lwta_vision.callbacks.requeue import StepBoundaryRequeue
from lwta_vision.callbacks.rng import RNGStateCheckpoint
from lwta_vision.callbacks.run_dir import RunConfigCallback, run_dir
from lwta_vision.checkpoints import check_resume_checkpoint, read_checkpoint
from lwta_vision.lit import LitClassifier, NonFiniteLossError

TRAINER_DEFAULTS = {
    "default_root_dir": "runs",
    "logger": {
        "class_path": "lwta_vision.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}

# ckpt_path values Lightning resolves itself (not file paths)
_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


class LwtaCLI(LightningCLI):
    """Links the datamodule's ``num_classes``, ``in_channels`` and ``class_names`` into the model and adds an
    always-on ``checkpoint`` (ModelCheckpoint on ``val/acc``, configurable as ``--checkpoint.*``), an optional
    ``ema`` (Lightning's weight averaging, off unless set: ``--config configs/callbacks/ema.yaml``) and
    ``weights_only: true`` for every ``--ckpt_path`` (a checkpoint never runs pickled code).

    Checks what would otherwise fail deep inside ``trainer.fit`` before anything is written: the output
    folders, ``--ckpt_path`` (readable, same architecture) and the dissection callback's layer paths. A run
    that fails before its first checkpoint leaves no run folder behind.
    """

    def add_arguments_to_parser(self, parser) -> None:
        # last.ckpt = the latest epoch (Lightning 2.6's ModelCheckpoint writes it only with a new best)
        parser.add_lightning_class_args(LastModelCheckpoint, "checkpoint")
        # RNG states in every checkpoint: epoch-boundary resume continues the same random streams
        parser.add_lightning_class_args(RNGStateCheckpoint, "rng_state")
        # SLURM auto-requeue saves its hpc checkpoint at a step boundary: the requeued job resumes exactly
        parser.add_lightning_class_args(StepBoundaryRequeue, "requeue")
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
        if WeightAveraging is not None:
            parser.add_argument("--ema", type=Optional[WeightAveraging], default=None,
                                help="weight averaging (e.g. lightning.pytorch.callbacks.EMAWeightAveraging): "
                                     "validation, dissection and checkpoints use the averaged weights")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, {}):
            parser.set_defaults(weights_only=True)  # Lightning's default unpickles anything in the file
        return parser

    def instantiate_trainer(self, **kwargs):
        """The ``ema`` callback joins the others after every NeuronDissection: it swaps the averaged weights in
        at the start of validation and back at its end, so a dissection after it would see the raw weights."""
        from lwta_vision.callbacks import NeuronDissection

        ema = self._get(self.config_init, "ema") if WeightAveraging is not None else None
        trainer = super().instantiate_trainer(**kwargs)
        if ema is not None:
            callbacks = trainer.callbacks
            last_dissection = max((i for i, cb in enumerate(callbacks) if isinstance(cb, NeuronDissection)),
                                  default=-1)
            callbacks.insert(last_dissection + 1, ema)
        return trainer

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the hyper-parameters of --ckpt_path right after parsing (torch.load): check the
        # file first so a missing, truncated or foreign file is one clear error
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if _is_ckpt_file_path(path):
            read_checkpoint(path, mmap=True)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI re-reads the model's init args from ``--ckpt_path``'s hyper-parameters, and rebuilding
        the model's class spec from them resets the arguments the module does not save (its ``optimizer`` and
        ``lr_scheduler`` callables) to their defaults: a resumed run silently trained without its learning-rate
        schedule. Those two are kept from the config the run was started with."""
        sub = self.config.get("subcommand")
        keep = {}
        if sub and self.config[sub].get("ckpt_path"):
            init = self.config[sub].get("model", {}).get("init_args") or {}
            keep = {k: init.get(k) for k in ("optimizer", "lr_scheduler") if init.get(k) is not None}
        super()._parse_ckpt_path()
        for k, v in keep.items():
            self.config[sub]["model"]["init_args"][k] = v

    def _run_subcommand(self, subcommand: str) -> None:
        self._check_before_run(subcommand)
        loggers = [lg for lg in self.trainer.loggers  # file loggers (CSV, TensorBoard); not fast_dev_run's dummy
                   if all(isinstance(getattr(lg, a, None), str) for a in ("save_dir", "root_dir"))]
        # folders that exist before the run are never removed; log_dir is only read early when its version is
        # explicit (reading it otherwise fixes the version before Lightning does, e.g. per DDP rank)
        existed = {Path(p) for lg in loggers for p in (lg.save_dir, lg.root_dir) if Path(p).exists()}
        existed |= {Path(lg.log_dir) for lg in loggers
                    if getattr(lg, "_version", None) is not None and Path(lg.log_dir).exists()}
        try:
            super()._run_subcommand(subcommand)
            if subcommand == "fit" and not self.trainer.fast_dev_run:
                folder = run_dir(self.trainer)  # a collective under DDP: every rank asks
                if self.trainer.is_global_zero:
                    print(f"run folder: {folder} (config.yaml, checkpoints/, dissection/)")
        except Exception:
            saved = any(getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "")
                        for cb in self.trainer.checkpoint_callbacks)
            if self.trainer.is_global_zero and not saved:
                _remove_unfinished_run(loggers, existed)
                for cb in self.trainer.callbacks:  # the run folder of loggers without one (wandb)
                    folder = getattr(cb, "folder", None) if isinstance(cb, RunConfigCallback) else None
                    if folder is not None and cb.created_folder and folder.is_dir() and not any(folder.rglob("*.ckpt")):
                        shutil.rmtree(folder, ignore_errors=True)
            raise

    def _check_before_run(self, subcommand: str) -> None:
        from lwta_vision.callbacks import NeuronDissection
        from lwta_vision.dissect.recording import resolve_layers

        trainer = self.trainer
        check_output_dir(trainer.default_root_dir, "trainer.default_root_dir")
        for lg in trainer.loggers:
            if getattr(lg, "save_dir", None):
                check_output_dir(lg.save_dir, "trainer.logger.init_args.save_dir")
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                check_output_dir(cb.dirpath, "checkpoint.dirpath")
            if isinstance(cb, NeuronDissection):  # the callback checks again in setup(), after the run folder
                resolve_layers(getattr(self.model, "model", self.model), cb.layers + cb.iou_layers)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # Lightning starts one process per CPU "device" (64 processes for devices=64); 2 stay allowed on any
        # machine so DDP can be tried on a laptop or a 1-core CI runner
        if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > max(cores, 2):
            raise ValueError(f"trainer.devices={trainer.num_devices} with trainer.accelerator=cpu would start "
                             f"{trainer.num_devices} training processes on {cores} CPU cores; set --trainer.devices "
                             f"to at most {max(cores, 2)}, or use --trainer.accelerator gpu on a machine with GPUs")
        path = self.config_init[subcommand].get("ckpt_path")
        if _is_ckpt_file_path(path):
            check_resume_checkpoint(path, self.model.state_dict())


def _is_ckpt_file_path(path) -> bool:
    return bool(path) and str(path).split(":")[0] not in _CKPT_KEYWORDS and "://" not in str(path)


def _remove_unfinished_run(loggers, existed: set[Path]) -> None:
    """Remove the run folders this run created (it failed before writing a checkpoint)."""
    for lg in loggers:
        run_dir = Path(lg.log_dir)
        if run_dir not in existed and run_dir.is_dir() and not any(run_dir.rglob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        for parent in (Path(lg.root_dir), Path(lg.save_dir)):  # created by this run and now empty
            if parent not in existed and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()


def check_output_dir(path, option: str) -> None:
    """Fail early, naming ``option``, when the folder ``path`` cannot be created or written to."""
    path = Path(path).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot write to {option}={str(path)!r}: {str(probe)!r} is a file, not a folder; "
                         f"choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {option}={str(path)!r}: {str(probe)!r} is not writable; "
                         f"choose a folder you can write to")


def cli_main(args: Optional[list[str]] = None, run: bool = True) -> LwtaCLI:
    """Entry point used by tests (``args`` as a list of strings); train.py calls :func:`main`."""
    # interpolations name absolute keys (${trainer.max_epochs}) as in every Lightning config, not relative ones
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return LwtaCLI(
        LitClassifier,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        # allow_abbrev=False: a typo such as --trainer.max_epoch is an error, not a silent prefix match
        # omegaconf+: ${...} interpolations resolve after every --config and --flag is merged, so
        # T_max: ${trainer.max_epochs} follows --trainer.max_epochs (plain "omegaconf" resolves each file alone)
        parser_kwargs={"parser_mode": "omegaconf+", "allow_abbrev": False},
        save_config_callback=RunConfigCallback,  # config.yaml in the run's own folder, for every logger
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


# errors that describe a wrong input, not a bug: shown as one line (LWTA_DEBUG=1 shows the traceback)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, NonFiniteLossError,
                                                MisconfigurationException)


def _user_error(err: BaseException) -> Optional[BaseException]:
    """The user-facing error behind ``err``, or None for a bug.

    jsonargparse wraps an error raised by a class built from the config ("Does not validate against any of
    the Union subtypes ... Errors: - <ours>") and keeps ours as ``__cause__``; that one is shown. A TypeError
    from a constructor (a misspelled ``model_kwargs`` key) counts as a config error there too.
    """
    from lwta_vision.dissect.clip_dissect.scorers import WeightsUnavailableError

    tb = traceback.extract_tb(err.__traceback__)
    while err.__cause__ is not None and tb and "jsonargparse" in tb[-1].filename:
        err = err.__cause__
        if isinstance(err, TypeError):
            return err
        tb = traceback.extract_tb(err.__traceback__)
    return err if isinstance(err, USER_ERRORS + (WeightsUnavailableError,)) else None


def error_message(err: BaseException) -> str:
    """One line for the user: the message (KeyError without its quotes), plus a hint where Lightning's lacks one."""
    msg = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, MisconfigurationException):
        msg = " ".join(msg.split())  # Lightning's messages span lines
    if isinstance(err, MisconfigurationException) and any(w in msg.lower() for w in ("accelerator", "gpu", "cuda",
                                                                                       "device")):
        import torch

        msg += (f" (this machine has {torch.cuda.device_count()} CUDA device(s): set --trainer.accelerator cpu or "
                f"auto, and --trainer.devices to at most the number available)")
    return msg


def main(args: Optional[list[str]] = None) -> None:
    """train.py: :func:`cli_main`, with user-facing errors as ``error: <message>`` and exit code 2."""
    try:
        cli_main(args)
    except Exception as err:
        user = _user_error(err)
        if user is None or os.environ.get("LWTA_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {error_message(user)}", file=sys.stderr)
        raise SystemExit(2) from None
