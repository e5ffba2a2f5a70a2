"""What a dissection returns, for every method: one row per unit, a layer's labels, tie-aware ranking.

Ties are decided, not left to rounding: :func:`rank_concepts` treats scores within ``tol`` as equal and
ranks them by a second key, then by concept order, so a machine's last bits never pick a label (why soft-WPMI
needs this: :mod:`lwta_vision.dissect.clip_dissect.labeling`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

TIE_TOL = 1e-3
"""Scores closer than this (in the similarity's units; nats for soft-WPMI) count as a tie."""
NEAR_TIE_FACTOR = 10.0
"""A label decided by score with a margin below ``NEAR_TIE_FACTOR * tie_tol`` is flagged as a near tie."""
DECIDED_BY = ("score", "contrast", "order")
QUALITY_FIELDS = ("label_corr", "label_auprc", "label_base_rate", "label_f1_005", "label_iou_005", "label_f1_02",
                  "label_iou_02")
"""Held-out label quality, per unit (computed on images that did not choose the label; ``dissect/evaluate/quality.py``)."""
INSAMPLE_FIELDS = ("label_corr_insample", "label_auprc_insample")
"""The same correlation and AUPRC on the images that chose the label (optimistic; shown to measure the gap)."""
QUALITY_NAMES = QUALITY_FIELDS + INSAMPLE_FIELDS
"""Every label-quality field of a row, held-out first."""
_ROWS = 256  # units ranked at once


@dataclass
class NeuronRow:
    layer: str
    unit: int
    label: Optional[str]
    score: Optional[float]
    next_labels: list[str]
    next_scores: list[float]
    win_rate: float
    input_rate: float
    active: bool
    top_images: list[int]
    margin: Optional[float] = None  # score minus the best other concept's score
    tie_margin: Optional[float] = None  # in a tie: the label's contrast minus the best other tied concept's
    decided_by: Optional[str] = None  # "score", "contrast" (a tie within tie_tol) or "order"
    # label quality on the held-out probe images (the ones that did not choose the label; quality.py)
    label_corr: Optional[float] = None  # Pearson(activation, the label's signal)
    label_auprc: Optional[float] = None  # AUPRC of the activation against the label's presence
    label_base_rate: Optional[float] = None  # the label's presence rate: AUPRC's chance level
    label_f1_005: Optional[float] = None  # F1 of the unit's top 0.5% of images against the label's presence
    label_iou_005: Optional[float] = None  # IoU of the same
    label_f1_02: Optional[float] = None  # F1 at the top 2%
    label_iou_02: Optional[float] = None  # IoU at the top 2%
    label_corr_insample: Optional[float] = None  # label_corr on the images that chose the label (optimistic)
    label_auprc_insample: Optional[float] = None  # label_auprc on the same

    def as_dict(self) -> dict:
        return {
            "layer": self.layer,
            "unit": self.unit,
            "label": self.label,
            "score": self.score,
            "label_2": self.next_labels[0] if len(self.next_labels) > 0 else None,
            "score_2": self.next_scores[0] if len(self.next_scores) > 0 else None,
            "label_3": self.next_labels[1] if len(self.next_labels) > 1 else None,
            "score_3": self.next_scores[1] if len(self.next_scores) > 1 else None,
            "win_rate": self.win_rate,
            "input_rate": self.input_rate,
            "active": self.active,
            "margin": self.margin,
            "decided_by": self.decided_by,
            "tie_margin": self.tie_margin,
            **{name: getattr(self, name) for name in QUALITY_NAMES},
            "top_images": self.top_images,
        }


@dataclass
class LayerLabels:
    layer: str
    rows: list[NeuronRow]
    summary: dict
    scores: Optional[Tensor] = None  # [K, M] similarity of every unit (inactive rows NaN), float32
    tie_key: Optional[Tensor] = None  # [K, M] second ranking key (the WPMI family's contrast), float32
    tie_tol: float = TIE_TOL
    ranking: Optional[Tensor] = None  # [K, RANKED] best concepts, ranked in float64 when labelling

    @property
    def labels(self) -> list[Optional[str]]:
        return [r.label for r in self.rows]

    def top_labels(self, n: int = 5, concepts: Optional[Sequence[str]] = None) -> list[list[str]]:
        """Best ``n`` labels per unit (needs ``scores`` and the concept list)."""
        if self.scores is None or concepts is None:
            return [[l for l in [r.label] + r.next_labels if l] for r in self.rows]
        if self.ranking is not None and n <= self.ranking.shape[1]:
            idx = self.ranking[:, :n]
        else:  # beyond the ranked few: re-rank the stored float32 scores
            idx, _ = rank_concepts(self.scores, self.tie_key, n, self.tie_tol)
        return [[concepts[j] for j in row] if r.active else [] for row, r in zip(idx.tolist(), self.rows)]


def rank_concepts(scores: Tensor, tie_key: Optional[Tensor] = None, n: int = 3,
                  tol: float = TIE_TOL) -> tuple[Tensor, Tensor]:
    """Each unit's ``n`` best concepts, best first, with ties decided by ``tie_key``, then concept order.

    At every position the candidates are the concepts not yet taken whose score is within ``tol`` of the
    best remaining score; among them the largest ``tie_key`` wins (again within ``tol``), then the lowest
    concept index. A rounding-level difference therefore never decides a label.

    Args:
        scores: [K, M] scores, higher is better (NaN rows: units without scores).
        tie_key: optional [K, M] second key, higher is better.
        n: concepts per unit (clipped to M).
        tol: absolute tolerance under which two scores (or keys) are equal.

    Returns:
        ``(index [K, n], decided [K, n])``: concept indices, and per position 0 when the score decided,
        1 when the second key did, 2 when only the concept order did.
    """
    if tol < 0:
        raise ValueError(f"tie tolerance must be >= 0, got {tol}")
    num_units, m = scores.shape
    n = min(n, m)
    index = torch.empty(num_units, n, dtype=torch.long, device=scores.device)
    decided = torch.empty(num_units, n, dtype=torch.long, device=scores.device)
    for lo in range(0, num_units, _ROWS):  # [rows, M] temporaries: bounded memory at 20k concepts
        hi = min(lo + _ROWS, num_units)
        s = _nan_to_minus_inf(scores[lo:hi])
        key = torch.zeros_like(s) if tie_key is None else _nan_to_minus_inf(tie_key[lo:hi])
        taken = torch.zeros_like(s, dtype=torch.bool)
        rows = torch.arange(hi - lo, device=s.device)
        for p in range(n):
            s_p = s.masked_fill(taken, -math.inf)
            cand = (s_p >= s_p.amax(1, keepdim=True) - tol) & ~taken
            k_p = key.masked_fill(~cand, -math.inf)
            cand2 = cand & (k_p >= k_p.amax(1, keepdim=True) - tol)
            j = cand2.to(torch.uint8).argmax(1)  # first True: the lowest concept index among the finalists
            index[lo:hi, p] = j
            decided[lo:hi, p] = torch.where(cand.sum(1) == 1, 0, torch.where(cand2.sum(1) == 1, 1, 2))
            taken[rows, j] = True
    return index, decided


def _nan_to_minus_inf(x: Tensor) -> Tensor:
    """float64 copy with NaN (no score) as -inf; real infinities stay infinite."""
    x = x.double()
    return torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)


def _margins(scores: Tensor, tie_key: Optional[Tensor], label: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Per unit: the label's score minus the best other score, and its tie key minus the best other key
    among the concepts within ``tol`` of the best score (-inf/NaN where undefined)."""
    margin = torch.full((scores.shape[0],), math.nan, dtype=torch.float64)
    tie_gap = torch.full_like(margin, math.nan)
    for lo in range(0, scores.shape[0], _ROWS):
        hi = min(lo + _ROWS, scores.shape[0])
        s = _nan_to_minus_inf(scores[lo:hi])
        j = label[lo:hi, None]
        margin[lo:hi] = s.gather(1, j)[:, 0] - s.scatter(1, j, -math.inf).amax(1)
        if tie_key is not None:
            key = _nan_to_minus_inf(tie_key[lo:hi])
            tied = (s >= s.amax(1, keepdim=True) - tol).scatter_(1, j, False)  # the other finalists
            tie_gap[lo:hi] = key.gather(1, j)[:, 0] - key.masked_fill(~tied, -math.inf).amax(1)
    return margin, tie_gap


def _finite_or_none(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


def _mean_of(values) -> Optional[float]:
    """Mean of the defined values; None (not NaN: outputs never show NaN) when there is none."""
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def label_drift(previous: Sequence[Optional[str]], current: Sequence[Optional[str]]) -> float:
    """Fraction of units whose label changed between two dissections of the same layer."""
    if len(previous) != len(current) or not current:
        return float("nan")
    return sum(a != b for a, b in zip(previous, current)) / len(current)
