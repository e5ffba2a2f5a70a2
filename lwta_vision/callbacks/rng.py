"""Save the torch / CUDA / numpy / python RNG states in checkpoints, so a resumed run continues the same streams.

Lightning does not checkpoint RNG states: a run resumed from an epoch-boundary checkpoint would draw its next
shuffle and its LWTA Gumbel noise from a freshly seeded stream and end elsewhere. With this callback (on by
default in train.py) it ends bit-identical on CPU, from an epoch boundary or mid-epoch (the training loaders are
stateful, see ``lwta_vision.data.base.EpochShuffleSampler``).

Under DDP every rank has its own streams (see ``distinct_rank_streams``): each checkpoint holds all ranks'
states (gathered when it is written) and a resumed run with the same number of processes gives each rank its
own state back. With another number of processes the states are not restored (a warning says so): the data
is sharded differently anyway, so the run cannot continue the same streams.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


class RNGStateCheckpoint(Callback):
    """Store and restore RNG states (as weights_only-loadable tensors and lists), per DDP rank.

    Args:
        distinct_rank_streams: under DDP, reseed the generators of ranks 1..N-1 at setup from (the seed,
            rank), so that the ranks draw different LWTA noise and main-process augmentations instead of the
            same numbers (``seed_everything`` gives every rank the same seed). Rank 0 keeps its stream, so a
            1-process run is unchanged. Samplers are not affected (DistributedSampler has its own seed).
    """

    def __init__(self, distinct_rank_streams: bool = True):
        self.distinct_rank_streams = distinct_rank_streams
        self._world_size, self._rank, self._stage = 1, 0, "fit"

    def setup(self, trainer, pl_module, stage: str) -> None:
        # setup runs before Lightning restores a checkpoint, so a resumed run's restored states win
        self._world_size, self._rank, self._stage = trainer.world_size, trainer.global_rank, stage
        if self.distinct_rank_streams and self._world_size > 1 and self._rank > 0:
            seed_rank_streams(torch.initial_seed(), self._rank)

    def state_dict(self) -> dict[str, Any]:
        """This rank's states, or under DDP every rank's (a collective: Lightning writes checkpoints on all ranks)."""
        local = _collect()
        if self._world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks: list[Optional[dict]] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, local)
            return {"world_size": len(ranks), "ranks": ranks}
        return {"world_size": 1, "ranks": [local]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ranks" not in state_dict:  # written before per-rank states (one process's states at top level)
            state_dict = {"world_size": 1, "ranks": [state_dict]}
        saved = state_dict["world_size"]
        if saved != self._world_size:
            if self._stage != "fit":  # validate/test/predict of a DDP checkpoint: nothing to continue
                return
            warnings.warn(f"RNGStateCheckpoint: the checkpoint holds the RNG states of {saved} process(es) and this "
                          f"run has {self._world_size}; RNG states are not restored, so the resumed run is not "
                          f"bit-identical to an uninterrupted one")
            return
        _restore(state_dict["ranks"][self._rank])


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python from ``(seed, rank)``; leaves PL_GLOBAL_SEED alone."""
    torch_seed, np_seed, py_seed = np.random.SeedSequence([seed % 2**63, rank]).generate_state(3, dtype=np.uint64)
    torch.manual_seed(int(torch_seed) % 2**63)
    np.random.seed(int(np_seed) % 2**32)
    random.seed(int(py_seed))


def _collect() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "python": _to_lists(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def _restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x
