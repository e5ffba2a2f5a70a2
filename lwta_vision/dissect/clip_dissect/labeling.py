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
from typing import Optional, Sequence

import torch
from torch import Tensor

from lwta_vision.dissect.clip_dissect.image_concept import ImageConcept, images_of
from lwta_vision.dissect.clip_dissect.similarity import get_similarity
from lwta_vision.dissect.evaluate.quality import holdout_split, label_quality, presence_by_threshold
from lwta_vision.dissect.labels import (
    DECIDED_BY,
    NEAR_TIE_FACTOR,
    QUALITY_NAMES,
    TIE_TOL,
    LayerLabels,
    NeuronRow,
    _finite_or_none,
    _margins,
    _mean_of,
    label_drift,
    rank_concepts,
)
from lwta_vision.dissect.ranking import top_images
from lwta_vision.dissect.recording import LayerRecord, order_by_image

# label_drift and the label types: also the names of `lwta_vision.dissect.engine`, this module's old path
__all__ = ["label_layer", "label_records", "tie_contrast", "label_drift", "rank_concepts", "LayerLabels",
           "NeuronRow", "TIE_TOL", "NEAR_TIE_FACTOR"]

PRIOR_UNITS = ("active", "all")
HOLDOUT = 0.5  # the fraction of probe images that never choose a label and score its quality
RANKED = 5  # concepts ranked per unit when labelling (top_labels up to this many are exact)


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
    image_concept: ImageConcept,
    concepts: Sequence[str],
    similarity: str = "soft_wpmi",
    similarity_kwargs: Optional[dict] = None,
    report_top_images: int = 10,
    tie_tol: float = TIE_TOL,
    prior_units: str = "active",
    device: Optional[torch.device] = None,
    holdout: float = HOLDOUT,
    split_seed: int = 0,
) -> LayerLabels:
    """Score every active unit of a layer against every concept and keep the best three labels.

    Units that never won on the probe set (LWTA losers everywhere) are reported inactive with no label:
    a label for a unit that never fires would describe noise. Scores within ``tie_tol`` of each other are
    ties, decided by the contrast of the unit's log p(t|k) with the layer's mean, where the similarity
    provides log p(t|k) (the WPMI family; see the module docstring and :func:`rank_concepts`). Other
    similarities rank by their exact score (tolerance 0), exact ties by concept order. Every labelled row
    carries its label's quality, ``label_corr`` and ``label_auprc`` (see :mod:`lwta_vision.dissect.evaluate.quality`).

    ``prior_units``: the units over which the WPMI family's prior log p(t) (and the tie key's mean) is
    taken: ``"active"`` (default) or ``"all"`` (CLIP-Dissect's code, which includes units that never fire;
    their "top images" are an arbitrary tie among zeros). Measured on planted units (RESULTS.md §4).

    ``device``: where the similarity is computed (a GPU: soft-WPMI's K x top_k x M terms are the work), default
    where ``image_concept`` is; the results are on the CPU either way.

    ``holdout``: the fraction of the probe images (:func:`~lwta_vision.dissect.evaluate.quality.holdout_split`
    with ``split_seed``, a hash of each image's index) that never choose a label: the label is chosen on the
    others and its quality (``label_corr``, ``label_auprc``, F1/IoU) is computed on these, so it is not inflated
    by the choice of the best of many concepts. The same figures on the choosing images are ``*_insample``.
    0 chooses on every image and reports in-sample figures only.
    """
    if prior_units not in PRIOR_UNITS:
        raise ValueError(f"prior_units must be one of {', '.join(PRIOR_UNITS)}, got {prior_units!r}")
    if image_concept.shape[1] != len(concepts):
        raise ValueError(f"image-concept matrix has {image_concept.shape[1]} columns for {len(concepts)} concepts")
    n = image_concept.shape[0]
    acts = order_by_image(record, n)
    active = record.active
    held = holdout_split(n, holdout, split_seed)
    if holdout > 0 and (int(held.sum()) < 2 or int((~held).sum()) < 1):
        raise ValueError(f"{n} probe images are too few to hold {holdout:.0%} out for label quality; use more "
                         "images or holdout=0")
    choose = (~held).nonzero().flatten()
    chosen_acts, chosen_concept = (acts, image_concept) if holdout == 0 else (
        acts.index_select(0, choose), images_of(image_concept, choose))
    fn = get_similarity(similarity)
    kwargs = dict(similarity_kwargs or {})
    with_key = _uses_log_likelihood(fn)
    # kept in the similarity's dtype (float64 for the WPMI family): rounding to float32 manufactures ties
    scores = torch.full((record.num_units, len(concepts)), float("nan"), dtype=torch.float64)
    tie_key = torch.full_like(scores, float("nan")) if with_key else None
    if active.any():
        over = active if prior_units == "active" else torch.ones_like(active)
        dev = image_concept.device if device is None else torch.device(device)
        a, p = chosen_acts[:, over].to(dev), chosen_concept.to(device=dev, dtype=torch.float32)
        if with_key:
            s, log_p = fn(a, p, return_log_likelihood=True, **kwargs)
            tie_key[active] = tie_contrast(log_p).double().cpu()[active[over]]
        else:
            s = fn(a, p, **kwargs)
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
    top_img = top_images(acts, report_top_images)  # the ranking rule: no images where the unit is 0
    label_index = torch.where(active.cpu(), top_j[:, 0], -1)
    insample = label_quality(chosen_acts, chosen_concept, label_index)
    quality = {f"{name}_insample": insample[name] for name in ("label_corr", "label_auprc")}
    if holdout > 0:
        held_idx = held.nonzero().flatten()
        quality.update(label_quality(acts.index_select(0, held_idx), images_of(image_concept, held_idx), label_index))
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
                top_images=top_img[u],
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
            **{f"mean_{name}": _mean_of(getattr(r, name) for r in labelled)
               for name in QUALITY_NAMES},
            "holdout": holdout,
            "holdout_images": int(held.sum()),
            # how presence was read for AUPRC/F1/IoU: "annotations", or "threshold" (Otsu on a CLIP similarity)
            "presence": "threshold" if presence_by_threshold(image_concept, label_index[label_index >= 0])
            else "annotations",
        }
    )
    # kept for top_labels in float32: half the memory of the float64 the ranking used (2048 units x 20k
    # concepts: 164 MB per matrix)
    return LayerLabels(layer=record.name, rows=rows, summary=summary, scores=scores.float(),
                       tie_key=None if tie_key is None else tie_key.float(), tie_tol=tol, ranking=ranking)


def label_records(
    records: dict[str, LayerRecord],
    image_concept: ImageConcept,
    concepts: Sequence[str],
    similarity: str = "soft_wpmi",
    similarity_kwargs: Optional[dict] = None,
    tie_tol: float = TIE_TOL,
    device: Optional[torch.device] = None,
    holdout: float = HOLDOUT,
    split_seed: int = 0,
) -> dict[str, LayerLabels]:
    """:func:`label_layer` for each recorded layer, against one image-concept matrix."""
    return {name: label_layer(rec, image_concept, concepts, similarity, similarity_kwargs, tie_tol=tie_tol,
                              device=device, holdout=holdout, split_seed=split_seed)
            for name, rec in records.items()}
