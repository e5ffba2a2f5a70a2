"""Which images are a unit's top images: a rule that never depends on the order of the probe (torch only).

Every method that ranks a unit's images (soft-WPMI and WPMI's top-k, rank_reorder, Describe-and-Dissect's
exemplars, the reports' top images) goes through here, because ``torch.topk`` leaves the order of equal
values unspecified and an LWTA unit is full of them: it is exactly 0 on every image where it never wins (at
U=24 about 96% of a vector unit's images), so most of its "top 100" used to be an arbitrary pick among zeros,
chosen by the backend and the order of the probe, which moved soft-WPMI scores by whole nats.

The rule, for each unit over the probe images:

1. **Images where the unit is exactly 0 are never top images**, when two or more images are 0 and some image
   is not. That is where an LWTA unit lost its block (or a ReLU unit is off): the value says nothing about what
   the unit detects, and CLIP-Dissect's top-k means "the images the unit fires on most". The top-k is taken
   among the other images; a unit that fires on fewer than ``top_k`` images has fewer top images, and
   soft-WPMI rescales its sum to ``top_k`` terms (:attr:`TopMembership.scale`) so it enters the concept prior
   on the same footing as a unit with a full top-k.
2. **Tied images share the positions they span.** A group of g equal values occupying sorted positions
   [s, e) gets, for each member, the mean rank weight of those positions; a group cut by the top-k boundary
   at position k includes every member with mass (k - s) / g (the expected membership under a uniformly
   random order of the tie), so the k slots are filled exactly.
3. A unit that is 0 everywhere (or constant) shares all k slots among all its images (and shows none, see
   :func:`top_images`).

The result is a function of the multiset of (value, image) pairs: permuting the probe permutes the pairs and
changes nothing else (to float summation order).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["RULE_VERSION", "TopMembership", "top_membership", "top_images", "zeros_excluded"]

RULE_VERSION = 1
"""Bump when the rule picks other top images (results are stamped with it; 0 was ``torch.topk``'s tie order)."""


@dataclass
class TopMembership:
    """Each unit's top images as (image, unit) pairs, with the rank weight and the mass of each pair.

    Attributes:
        image, unit: [P] long, the pairs (every unit's pairs together, in no particular order).
        weight: [P] the soft membership weight of the positions the pair's tie group spans (mean over them);
            1 without a ramp (WPMI).
        mass: [P] how much of one position the image takes: 1, or (slots in the top-k) / (group size) for a
            tie group cut by the top-k boundary.
        scale: [K] ``top_k / total mass``: 1 for a unit with a full top-k, more for a unit that fires on fewer
            than ``top_k`` images (rule 1).
    """

    image: Tensor
    unit: Tensor
    weight: Tensor
    mass: Tensor
    scale: Tensor

    def images_of(self, unit: int) -> Tensor:
        """The top images of one unit, as a set (no order)."""
        return self.image[self.unit == unit]


def zeros_excluded(activations: Tensor) -> Tensor:
    """Per unit of ``activations`` [N, K]: whether its zeros are left out of its top images (rule 1: two or more
    images are exactly 0 and some image is not)."""
    zero = activations == 0
    return (zero.sum(0) >= 2) & ~zero.all(0)


def _group_bounds(sorted_values: Tensor) -> tuple[Tensor, Tensor]:
    """For values sorted along dim 0 (descending), each position's tie group [start, end) along dim 0."""
    n = sorted_values.shape[0]
    pos = torch.arange(n, device=sorted_values.device).unsqueeze(1).expand_as(sorted_values)
    first = torch.ones_like(sorted_values, dtype=torch.bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    start = torch.where(first, pos, torch.zeros_like(pos)).cummax(0).values
    end = torch.where(last, pos + 1, torch.full_like(pos, n)).flip(0).cummin(0).values.flip(0)
    return start, end


def _ramp(mean_position: Tensor, k: int, p_start: float, p_end: float) -> Tensor:
    """Soft-WPMI's linear membership ramp at a (possibly fractional) 0-based position."""
    return p_start - (mean_position / k) * (p_start - p_end)


@torch.no_grad()
def top_membership(
    activations: Tensor,
    top_k: int,
    p_start: Optional[float] = None,
    p_end: Optional[float] = None,
    dtype: torch.dtype = torch.float64,
) -> TopMembership:
    """The top images of every unit of ``activations`` [N images, K units] under the module's rule.

    ``p_start``/``p_end`` give soft-WPMI's membership ramp (weight p_start at rank 0, falling linearly by
    (p_start - p_end) / k per rank); without them every weight is 1 (WPMI's hard membership).
    """
    n, num_units = activations.shape
    if n == 0 or int(top_k) < 1:
        raise ValueError(f"top images need at least one image and top_k >= 1, got {n} images and top_k={top_k}")
    k = min(int(top_k), n)
    device = activations.device
    ramp = p_start is not None
    if ramp and not (0.0 <= p_end <= 1.0 and 0.0 <= p_start <= 1.0):
        raise ValueError(f"p_start and p_end must lie in [0, 1], got p_start={p_start}, p_end={p_end}")
    candidates = activations.masked_fill(zeros_excluded(activations) & (activations == 0), -math.inf)
    vals, idx = torch.topk(candidates, k, dim=0, largest=True, sorted=True)  # ties: any order, resolved below
    cut = vals[-1]  # [K] the k-th largest candidate; -inf for a unit with fewer than k candidates
    short = cut == -math.inf  # then every candidate is in the window, with its whole tie group
    inside = (vals > cut) | (short & (vals > -math.inf))  # tie groups that end inside the window
    start, end = _group_bounds(vals)
    mean_pos = (start + end - 1).to(dtype) / 2
    # groups inside the window: every member in, at the mean weight of the positions the group spans
    r_u = inside.nonzero()
    image_a, unit_a = idx[r_u[:, 0], r_u[:, 1]], r_u[:, 1]
    weight_a = _ramp(mean_pos[r_u[:, 0], r_u[:, 1]], k, p_start, p_end) if ramp else None
    mass_a = torch.ones(unit_a.shape[0], dtype=dtype, device=device)
    # the group at the cut: all of its members (it may reach past position k) share the slots left
    n_in = inside.sum(0)  # the cut group's first position
    eq = (candidates == cut) & ~short
    i_u = eq.nonzero()
    image_b, unit_b = i_u[:, 0], i_u[:, 1]
    slots = torch.where(short, torch.zeros_like(n_in), k - n_in).to(dtype)
    mass_b = (slots / eq.sum(0).clamp_min(1).to(dtype))[unit_b]
    weight_b = _ramp(((n_in + k - 1).to(dtype) / 2)[unit_b], k, p_start, p_end) if ramp else None
    total = n_in.to(dtype) + slots
    image = torch.cat([image_a, image_b])
    unit = torch.cat([unit_a, unit_b])
    mass = torch.cat([mass_a, mass_b])
    weight = torch.cat([weight_a, weight_b]) if ramp else torch.ones_like(mass)
    return TopMembership(image=image, unit=unit, weight=weight, mass=mass, scale=k / total)


@torch.no_grad()
def top_images(values: Tensor, n: int, ids: Optional[Tensor] = None) -> list[list[int]]:
    """Per unit of ``values`` [N, K] ([N] for one unit), the images to show as its top ``n``, most active first.

    Rule 1 applies (a unit that fires on 3 images shows 3), and a tie at the n-th value brings in every image
    tied with it, so which images are shown never depends on the probe's order; equal values are listed by
    image id, an order of display only. A constant unit (0 everywhere: an LWTA unit that never wins) shows
    none: no image is more its own than another. ``ids`` [N]: the id of each row (default: the row index).
    """
    if values.ndim == 1:
        values = values[:, None]
    count, num_units = values.shape
    ids = torch.arange(count) if ids is None else ids.long().cpu()
    values = values.cpu()
    if n < 1 or count == 0:
        return [[] for _ in range(num_units)]
    candidates = values.masked_fill(zeros_excluded(values) & (values == 0), -math.inf)
    vals, idx = candidates.topk(min(n, count), dim=0)  # [n, K]; the tie at the n-th value is completed below
    threshold = vals[-1]
    finite = vals > -math.inf
    reach = ((candidates >= threshold) & (candidates > -math.inf)).sum(0)  # images at or above the n-th value
    constant = values.amax(0) == values.amin(0)
    out = []
    for u in range(num_units):
        if bool(constant[u]):
            out.append([])
            continue
        if int(reach[u]) == int(finite[:, u].sum()):  # the top n hold the whole tie at the cut
            rows = idx[finite[:, u], u]
        else:
            rows = ((candidates[:, u] >= threshold[u]) & (candidates[:, u] > -math.inf)).nonzero().flatten()
        pairs = sorted(zip((-values[rows, u]).tolist(), ids[rows].tolist()))
        out.append([i for _, i in pairs])
    return out
