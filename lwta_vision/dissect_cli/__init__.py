"""``dissect.py``: describe neurons of a trained network in words, explain a prediction, evaluate labels.

Subcommands (flags or ``--config file.yaml``; ``python dissect.py <cmd> --help`` lists every option):
  describe  record layers on a probe set, score concepts, write CSV/JSON/HTML to ``--output_dir``
  explain   for one image: units that won in each layer, their labels, contributions to the prediction
  evaluate  final-layer label quality where unit i is class i (top-1/top-5, sentence-embedding cosine)
  iou       Network Dissection: IoU of thresholded maps with concept masks (generated data or Broden)
  dnd       Describe-and-Dissect: captions of attention crops, summarised by a language model, best candidate kept
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

from lwta_vision.checkpoints import CheckpointError
from lwta_vision.dissect.clip_dissect.scorers import WeightsUnavailableError
from lwta_vision.dissect.dnd.generative import MissingExtraError, SummarizerEndpointError
from lwta_vision.dissect_cli.commands.describe import describe
from lwta_vision.dissect_cli.commands.dnd import dnd
from lwta_vision.dissect_cli.commands.evaluate import evaluate
from lwta_vision.dissect_cli.commands.explain import explain
from lwta_vision.dissect_cli.commands.iou import iou

__all__ = ["describe", "dnd", "evaluate", "explain", "iou", "main"]

# errors that describe a wrong input: one ``error:`` line (LWTA_DEBUG=1 shows the traceback). Anything else
# (RuntimeError, torch.OutOfMemoryError, AssertionError, IndexError, a KeyError nobody raised on purpose) is a
# bug or a resource problem and keeps its traceback; a KeyError we raise on purpose is also a ValueError
# (UnknownConceptError). CheckpointError is a ValueError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, CheckpointError,
                                                WeightsUnavailableError, MissingExtraError, SummarizerEndpointError)


def main(args: Optional[list[str]] = None):
    from jsonargparse import CLI

    debug = os.environ.get("LWTA_DEBUG", "") not in ("", "0")
    try:
        return CLI([describe, explain, evaluate, iou, dnd], args=args, parser_mode="omegaconf",
                   description=__doc__)
    except Exception as err:
        user = _user_error(err)
        if user is None or debug:
            raise
        from lwta_vision.cli import error_message

        print(f"error: {error_message(user)}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(err: BaseException) -> Optional[BaseException]:
    """The user-facing error behind ``err`` (one of :data:`USER_ERRORS`), or None for a bug.

    As in train.py (``lwta_vision.cli._user_error``): jsonargparse wraps an error raised while building
    ``--data`` ("Does not validate against any of the Union subtypes ...") and keeps ours as ``__cause__``;
    that one is shown.
    """
    tb = traceback.extract_tb(err.__traceback__)
    while err.__cause__ is not None and tb and "jsonargparse" in tb[-1].filename:
        err = err.__cause__
        tb = traceback.extract_tb(err.__traceback__)
    return err if isinstance(err, USER_ERRORS) else None
