"""Label neurons: recorded activations x image-concept matrix -> per-neuron labels (torch only).

Ties are decided, not left to rounding. soft-WPMI saturates: log p(t|k) sums ~100 log-probabilities, so
one unit's likelihood of a concept usually exceeds every other unit's by many nats, log p(t) is then that
unit's term alone and the score is log K, for every concept that unit dominates, equal to the last bits
(measured on the quickstart's fc: most units, with ground truth and with the concept CLIP alike). A
machine's arithmetic would pick the label. Concepts whose scores lie within ``tie_tol`` of the best are
therefore treated as equal and ranked by a second key, the *contrast* log p(t|k) - mean_k' log p(t|k'):
how much more the unit's top images show t than a typical unit's top images do (PMI with a geometric-mean
prior, which does not saturate), then by their order in the concept list. The unit's own log p(t|k) alone
was measured as the second key and rejected: it prefers whatever is common among a unit's top images (a
plain background, a colour) over what sets them apart (the shape). Every row records its ``margin`` over
the runner-up and what decided it (``decided_by``: ``score``, ``contrast`` or ``order``).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from lwta_vision.dissect.quality import label_quality
from lwta_vision.dissect.recording import LayerRecord, order_by_image
from lwta_vision.dissect.similarity import get_similarity

TIE_TOL = 1e-3
"""Scores closer than this (in the similarity's units; nats for soft-WPMI) count as a tie."""
NEAR_TIE_FACTOR = 10.0
"""A label decided by score with a margin below ``NEAR_TIE_FACTOR * tie_tol`` is flagged as a near tie."""
DECIDED_BY = ("score", "contrast", "order")
PRIOR_UNITS = ("active", "all")
_ROWS = 256  # units ranked at once
RANKED = 5  # concepts ranked per unit when labelling (top_labels up to this many are exact)


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
    label_corr: Optional[float] = None  # Pearson(activation, the label's signal) over the probe images
    label_auprc: Optional[float] = None  # AUPRC of the activation against the label's presence
    label_base_rate: Optional[float] = None  # the label's presence rate: AUPRC's chance level

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
            "label_corr": self.label_corr,
            "label_auprc": self.label_auprc,
            "label_base_rate": self.label_base_rate,
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


def tie_contrast(log_p_t_given_k: Tensor) -> Tensor:
    """The tie-break key: log p(t|k) minus its mean over the layer's units (over the active units given)."""
    return log_p_t_given_k - log_p_t_given_k.mean(0, keepdim=True)


def _uses_log_likelihood(fn) -> bool:
    try:
        return "return_log_likelihood" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def label_layer(
    record: LayerRecord,
    image_concept: Tensor,
    concepts: Sequence[str],
    similarity: str = "soft_wpmi",
    similarity_kwargs: Optional[dict] = None,
    report_top_images: int = 10,
    tie_tol: float = TIE_TOL,
    prior_units: str = "active",
) -> LayerLabels:
    """Score every active unit of a layer against every concept and keep the best three labels.

    Units that never won on the probe set (LWTA losers everywhere) are reported inactive with no label:
    a label for a unit that never fires would describe noise. Scores within ``tie_tol`` of each other are
    ties, decided by the contrast of the unit's log p(t|k) with the layer's mean, where the similarity
    provides log p(t|k) (the WPMI family; see the module docstring and :func:`rank_concepts`). Other
    similarities rank by their exact score (tolerance 0), exact ties by concept order. Every labelled row
    carries its label's quality, ``label_corr`` and ``label_auprc`` (see :mod:`lwta_vision.dissect.quality`).

    ``prior_units``: the units over which the WPMI family's prior log p(t) (and the tie key's mean) is
    taken: ``"active"`` (default) or ``"all"`` (CLIP-Dissect's code, which includes units that never fire;
    their "top images" are an arbitrary tie among zeros). Measured on planted units (RESULTS.md §4).
    """
    if prior_units not in PRIOR_UNITS:
        raise ValueError(f"prior_units must be one of {', '.join(PRIOR_UNITS)}, got {prior_units!r}")
    if image_concept.shape[1] != len(concepts):
        raise ValueError(f"image-concept matrix has {image_concept.shape[1]} columns for {len(concepts)} concepts")
    n = image_concept.shape[0]
    acts = order_by_image(record, n)
    active = record.active
    fn = get_similarity(similarity)
    kwargs = dict(similarity_kwargs or {})
    with_key = _uses_log_likelihood(fn)
    # kept in the similarity's dtype (float64 for the WPMI family): rounding to float32 manufactures ties
    scores = torch.full((record.num_units, len(concepts)), float("nan"), dtype=torch.float64)
    tie_key = torch.full_like(scores, float("nan")) if with_key else None
    if active.any():
        over = active if prior_units == "active" else torch.ones_like(active)
        if with_key:
            s, log_p = fn(acts[:, over], image_concept.float(), return_log_likelihood=True, **kwargs)
            tie_key[active] = tie_contrast(log_p).double().cpu()[active[over]]
        else:
            s = fn(acts[:, over], image_concept.float(), **kwargs)
        scores[active] = s.double().cpu()[active[over]]
    if not (math.isfinite(tie_tol) and tie_tol >= 0):
        raise ValueError(f"tie_tol must be a finite number >= 0, got {tie_tol}")
    # the tolerance is in soft-WPMI's nats and needs the second key; other similarities (cosines bunch within
    # 1e-3 of each other) rank by their exact score, exact ties by concept order
    tol = tie_tol if with_key else 0.0
    ranking, how = rank_concepts(scores, tie_key, RANKED, tol)
    k = min(3, len(concepts))
    top_j = ranking[:, :k]
    top_s = scores.gather(1, top_j)
    margin_t, gap_t = _margins(scores, tie_key, top_j[:, 0], tol)
    margin = margin_t.tolist()
    tie_margin = [g if how[u, 0] == 1 and math.isfinite(g) else None for u, g in enumerate(gap_t.tolist())]
    top_img = record.top_indices[: min(report_top_images, record.top_indices.shape[0])].T
    quality = label_quality(acts, image_concept, torch.where(active.cpu(), top_j[:, 0], -1))
    quality = {k: [_finite_or_none(v) for v in t.tolist()] for k, t in quality.items()}
    rows = []
    for u in range(record.num_units):
        is_active = bool(active[u])
        labels = [concepts[j] for j in top_j[u].tolist()] if is_active else []
        vals = top_s[u].tolist() if is_active else []
        rows.append(
            NeuronRow(
                layer=record.name,
                unit=u,
                label=labels[0] if labels else None,
                score=vals[0] if vals else None,
                next_labels=labels[1:],
                next_scores=vals[1:],
                win_rate=float(record.win_rate[u]),
                input_rate=float(record.input_rate[u]),
                active=is_active,
                top_images=top_img[u].tolist(),
                margin=(margin[u] if math.isfinite(margin[u]) else None) if is_active else None,
                decided_by=DECIDED_BY[int(how[u, 0])] if is_active else None,
                tie_margin=tie_margin[u] if is_active else None,
                **{k: quality[k][u] for k in quality},
            )
        )
    summary = record.summary()
    labelled = [r for r in rows if r.active]
    ties = sum(r.decided_by != "score" for r in labelled)
    near = sum(r.decided_by == "score" and r.margin is not None and r.margin < NEAR_TIE_FACTOR * tol
               for r in labelled)
    summary.update(
        {
            "similarity": similarity,
            "unique_labels": len({r.label for r in labelled}),
            "mean_top_score": (sum(r.score for r in labelled) / len(labelled)) if labelled else None,
            "tie_tol": tol,
            "ties": ties,
            "near_ties": near,
            "mean_label_corr": _mean_of(r.label_corr for r in labelled),
            "mean_label_auprc": _mean_of(r.label_auprc for r in labelled),
            "mean_label_base_rate": _mean_of(r.label_base_rate for r in labelled),
        }
    )
    # kept for top_labels in float32: half the memory of the float64 the ranking used (2048 units x 20k
    # concepts: 164 MB per matrix)
    return LayerLabels(layer=record.name, rows=rows, summary=summary, scores=scores.float(),
                       tie_key=None if tie_key is None else tie_key.float(), tie_tol=tol, ranking=ranking)


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
