"""Planted neurons: hidden units trained to detect a known concept, the ground truth for judging labels.

A label for a hidden unit has nothing to be checked against, unless we decide in advance what the unit
does. Here chosen units of chosen layers get an auxiliary loss that ties their output to one concept's mask,
while every other unit trains freely on the class task (the idea of MAIA's and FIND's synthetic units,
applied inside a trained network). A describer that recovers the planted concepts on these units has shown
it can read a hidden layer; one that does not, cannot be trusted on the free units either.

Placement (:func:`assign_units`): concepts of one category (shapes, colours, textures on the generated data)
are mutually exclusive at a pixel, so they share LWTA blocks: in a block of U competitors, at each position
the unit of the concept present there should win. Each category starts a new block, so planted concepts of
different categories never compete; the rest of the layer is free. Torch only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

PLANT_MARGIN = 2.0
"""The output a planted unit is pushed to reach where its concept is (BatchNorm puts pre-activations near 1)."""


PLANTED_BY = ("mask", "presence")


@dataclass(frozen=True)
class PlantedUnit:
    """Unit ``unit`` of module ``layer`` is trained to detect ``concept``, tied to its mask or its presence."""

    layer: str
    unit: int
    concept: str
    by: str = "mask"

    def as_dict(self) -> dict:
        return asdict(self)


def assign_units(layer: str, concepts: Sequence[str], categories: Sequence[str], competitors: int = 1,
                 width: int | None = None, by: Sequence[str] | None = None) -> list[PlantedUnit]:
    """Units for ``concepts`` in ``layer``: consecutive within a category, each category from a new block.

    Args:
        concepts: the concepts to plant, in order.
        categories: the category of each concept (parallel to ``concepts``).
        competitors: the layer's LWTA block size U (1 for ReLU and other elementwise activations).
        width: the layer's number of units; checked when given.
        by: per concept, "mask" (default) or "presence" (see :func:`planted_loss`).
    """
    by = list(by) if by is not None else ["mask"] * len(concepts)
    bad = [b for b in by if b not in PLANTED_BY]
    if bad or len(by) != len(concepts):
        raise ValueError(f"planted_by must give 'mask' or 'presence' per concept, got {by}")
    if len(concepts) != len(categories):
        raise ValueError(f"{len(concepts)} concepts but {len(categories)} categories")
    if len(set(concepts)) != len(concepts):
        raise ValueError(f"planted concepts of {layer!r} repeat a name: {list(concepts)}")
    units, next_unit, previous = [], 0, None
    for concept, category, how in zip(concepts, categories, by):
        if previous is not None and (category, how) != previous and next_unit % competitors:
            next_unit += competitors - next_unit % competitors  # a new category starts a new block
        units.append(PlantedUnit(layer, next_unit, concept, how))
        next_unit, previous = next_unit + 1, (category, how)
    if width is not None and next_unit > width:
        raise ValueError(f"planting {len(concepts)} concepts in {layer!r} needs {next_unit} units (one block per "
                         f"category of U={competitors}) but the layer has {width}; plant fewer concepts")
    return units


def planted_loss(output: Tensor, masks: Tensor, margin: float = PLANT_MARGIN, presence: bool = False) -> Tensor:
    """Balanced hinge loss tying planted units' outputs to their concepts' masks.

    Where a cell of the unit's map is covered by the concept (fraction ``c`` of its pixels), the output is
    pushed above ``margin``; elsewhere below 0. The two sides are averaged separately, per unit, and added:
    sum c relu(margin - a) / sum c + sum (1 - c) relu(a) / sum (1 - c). Without the balance a shape covers
    ~3% of the cells, and silence (an LWTA unit that never wins) is the cheapest answer: measured, every
    shape unit of the first try stayed at chance. Zero and negative outputs cost nothing where the concept
    is absent, so an LWTA unit may satisfy that side by losing its block. Vector outputs (fc layers, pooled
    tokens), and maps with ``presence=True``, are tied to the concept's presence in the image: the map's
    maximum is pushed above ``margin`` where the concept is anywhere, every position below 0 elsewhere.

    Args:
        output: ``[B, P, h, w]`` or ``[B, P]``: the planted units' outputs.
        masks: ``[B, P, H, W]`` (bool or float) concept masks, one plane per planted unit.
    """
    cover = masks.float()
    if output.ndim == 4 and presence:
        output = output.flatten(2).amax(2)
    if output.ndim == 4:
        cover = F.adaptive_avg_pool2d(cover, output.shape[-2:])
    elif output.ndim == 2:
        cover = cover.flatten(2).amax(2)
    else:
        raise ValueError(f"planted units need [B, P, h, w] or [B, P] outputs, got shape {tuple(output.shape)}")
    out = output.float()
    dims = [d for d in range(out.ndim) if d != 1]  # everything but the unit axis
    pos = (cover * F.relu(margin - out)).sum(dims) / cover.sum(dims).clamp_min(1e-6)
    neg = ((1 - cover) * F.relu(out)).sum(dims) / (1 - cover).sum(dims).clamp_min(1e-6)
    return (pos + neg).mean()


def recovered(planted: Sequence[PlantedUnit], labels: dict[str, Sequence[str | None]]) -> list[bool]:
    """Per planted unit: is its top label (``labels[layer][unit]``) the planted concept?"""
    return [labels[p.layer][p.unit] == p.concept for p in planted]


def free_units(planted: Sequence[PlantedUnit], layer: str, width: int) -> list[int]:
    """The units of ``layer`` that were not planted."""
    taken = {p.unit for p in planted if p.layer == layer}
    return [u for u in range(width) if u not in taken]


def planted_from_checkpoint(checkpoint: dict) -> list[PlantedUnit]:
    """The planted units a :class:`~lwta_vision.lit.LitClassifier` checkpoint records (empty if none)."""
    return [PlantedUnit(**d) for d in checkpoint.get("planted_units", [])]


__all__ = ["PLANTED_BY", "PLANT_MARGIN", "PlantedUnit", "assign_units", "free_units", "planted_from_checkpoint",
           "planted_loss", "recovered"]
