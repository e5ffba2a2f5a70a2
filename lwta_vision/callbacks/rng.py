"""Save the torch / numpy / python RNG states in checkpoints, so a resumed run continues the same streams.

Lightning does not checkpoint RNG states: a run resumed from an epoch-boundary checkpoint would draw its next
shuffle and its LWTA Gumbel noise from a freshly seeded stream and end elsewhere. With this callback (on by
default in train.py) it ends bit-identical on CPU. Mid-epoch resume stays inexact: Lightning does not restore
the position inside a non-stateful DataLoader. Under DDP only rank 0's state is in the checkpoint, so states
are restored in single-process runs only (ranks keep their fresh seeds; a warning says so).
"""
from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGStateCheckpoint(Callback):
    """Store and restore RNG states (as weights_only-loadable tensors and lists)."""

    def __init__(self):
        self._world_size = 1

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._world_size = trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                "python": _to_lists(random.getstate())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._world_size > 1:
            warnings.warn("RNGStateCheckpoint: RNG states are not restored under DDP (the checkpoint holds rank "
                          "0's only); the resumed run is not bit-identical to an uninterrupted one")
            return
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        random.setstate(_to_tuples(state_dict["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x
