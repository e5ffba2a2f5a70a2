"""Opt-in statistics of LWTA layers, gathered by forward hooks that exist only inside a ``with`` block.

Nothing is stored on the modules: outside the block the forward pass is untouched, so training pays
nothing on steps that don't log. Inside, per layer: the fraction of non-zero outputs (ideally 1/U), the
per-unit win rate (and from it the win-rate entropy of each block), and optionally the KL(q || uniform)
regulariser (kept in the autograd graph).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from lwta_vision.layers.lwta import LWTA, lwta_modules


@dataclass
class LWTAStats:
    """Per-layer statistics of one or more forward passes (sums; read the properties for means)."""

    nonzero: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    wins: dict[str, Tensor] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    kl: dict[str, Tensor] = field(default_factory=dict)

    @property
    def sparsity(self) -> dict[str, float]:
        """Fraction of non-zero outputs per layer (1/U for a hard LWTA layer)."""
        return {k: self.nonzero[k] / max(self.count[k], 1) for k in self.nonzero}

    @property
    def win_rates(self) -> dict[str, Tensor]:
        """Per layer, per unit: the fraction of positions (image x location / token) where the unit won."""
        return {k: self.wins[k] / max(self.samples[k], 1) for k in self.wins}

    def win_entropy(self, competitors: dict[str, int]) -> dict[str, float]:
        """Per layer, the normalised entropy of its blocks' win rates (see ``win_entropy``)."""
        return {k: win_entropy(v, competitors[k]) for k, v in self.win_rates.items()}

    def kl_total(self) -> Optional[Tensor]:
        return torch.stack(list(self.kl.values())).sum() if self.kl else None


def win_entropy(wins: Tensor, competitors: int) -> float:
    """How evenly each block's units share the wins: 1 = uniform, 0 = one unit always wins (dead competitors).

    ``wins`` holds per-unit win counts or rates of one layer (blocks of ``competitors`` consecutive units).
    Per block: entropy of its normalised win rates divided by log U; the mean over blocks (blocks that never
    won anything are skipped). A layer can keep exactly 1/U active while most of its units are dead: the
    active fraction cannot show that, this can.
    """
    if competitors < 2:
        return 1.0
    p = wins.double().reshape(-1, competitors)
    total = p.sum(1, keepdim=True)
    p = p[total.squeeze(1) > 0] / total[total.squeeze(1) > 0]
    if not len(p):
        return 0.0
    h = -(p * p.clamp_min(1e-300).log()).sum(1) / math.log(competitors)
    return float(h.mean())


@contextmanager
def collect_lwta_stats(
    model: nn.Module, sparsity: bool = True, win_rates: bool = False, kl: bool = False
) -> Iterator[LWTAStats]:
    """Record statistics of every LWTA layer of ``model`` for the forward passes inside the block."""
    stats = LWTAStats()
    handles = []

    def make_hook(name: str, mod: LWTA):
        def hook(_m, inputs, output):
            if kl:
                stats.kl[name] = stats.kl.get(name, 0) + mod.kl_uniform(inputs[0])
            if not (sparsity or win_rates):
                return
            with torch.no_grad():
                active = output.detach() != 0
                if sparsity:
                    stats.nonzero[name] = stats.nonzero.get(name, 0.0) + float(active.sum())
                    stats.count[name] = stats.count.get(name, 0) + active.numel()
                if win_rates:
                    dim = mod.dim % output.ndim
                    per_unit = active.transpose(dim, -1).reshape(-1, output.shape[dim]).sum(0).double()
                    stats.wins[name] = stats.wins.get(name, 0) + per_unit.cpu()
                    stats.samples[name] = stats.samples.get(name, 0) + active.numel() // output.shape[dim]

        return hook

    try:
        for name, mod in lwta_modules(model).items():
            handles.append(mod.register_forward_hook(make_hook(name, mod)))
        yield stats
    finally:
        for h in handles:
            h.remove()
