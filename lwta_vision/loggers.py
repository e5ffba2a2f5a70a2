"""Lightning's CSVLogger, made safe for a run that continues in its own folder (a SLURM requeue)."""
from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Continues an existing ``metrics.csv`` instead of deleting it (Lightning's writer removes the file when
    the log folder is not empty, so a requeued job logging into the same folder lost every earlier row)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class CSVLogger(_LightningCSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` with the same arguments, whose ``metrics.csv`` is appended to when
    the run's folder already has one (an explicit ``version`` reused by a requeued job); a fresh folder behaves
    as Lightning's. The CLI flushes it whenever a checkpoint is written, so the file holds every row up to the
    newest checkpoint when a job is killed."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
