"""How good is a label? Agreement between a unit's activations and its label concept's signal (torch only).

A label's soft-WPMI score is not a quality measure: it is unnormalised and saturates (a unit that dominates
a concept scores log K whatever the concept). Oikarinen, Yan & Weng (ICML 2025, "Evaluating Neuron
Explanations", NeuronEval) put about 18 metrics through two sanity tests, "missing labels" (remove part of the
concept's positives: the metric must drop) and "extra labels" (add unrelated positives: it must drop); Pearson
correlation, cosine, AUPRC, F1 and IoU passed both. Here, per labelled unit:

- ``label_corr``: Pearson correlation between the unit's pooled activation and the label's column of the
  image-concept matrix (ground-truth presence, or a CLIP similarity as pseudo-label). 0 is chance, 1 perfect.
- ``label_auprc``: average precision of the activation as a detector of the label's presence. A column
  with two values (ground truth) is its own presence; a continuous one (CLIP similarities) is split into
  present/absent by Otsu's threshold on that concept's similarities, the pseudo-label ("presence by CLIP").
  Chance is the concept's base rate, reported beside it as ``label_base_rate``.
- ``label_f1_005``, ``label_iou_005``, ``label_f1_02``, ``label_iou_02``: NeuronEval's F1 and IoU between the
  label's presence and the unit's top-alpha images (alpha = 0.005 and 0.02 of the images; the tie at the
  threshold all in, and never an image where the unit is 0 when :mod:`lwta_vision.dissect.ranking` leaves
  those out).

**Held out.** A label is the best of up to 20,000 concepts for the probe images it was chosen on, so any
agreement measured on those same images is inflated by the choice. :func:`holdout_split` therefore splits the
probe by a seeded hash of each image's index: labels are chosen on one part and these figures are computed on
the other (``label_layer``'s ``holdout``). The same figures on the images that chose the label are kept as
``label_corr_insample`` and ``label_auprc_insample``, to show the gap.

All come from torchmetrics' functional metrics or closed forms, computed for all units of a layer at once.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Optional

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.classification import binary_average_precision, multilabel_average_precision

from lwta_vision.dissect.labels import INSAMPLE_FIELDS, QUALITY_FIELDS  # noqa: F401 (re-exported)
from lwta_vision.dissect.ranking import zeros_excluded

TOP_ALPHAS = {"005": 0.005, "02": 0.02}
"""NeuronEval's top-alpha fractions for F1 and IoU, by the suffix of their field names in ``QUALITY_FIELDS``."""


SPLIT_VERSION = 1
"""Bump when :func:`holdout_split` puts an image in another part (results are stamped with it)."""


def holdout_split(num_images: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """Bool [num_images]: True for the images held out from choosing labels.

    Each image's part is a hash of (seed, its probe index), so it does not depend on how many images there
    are, on the order they are recorded in, or on the machine; about ``fraction`` of them are held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return torch.zeros(num_images, dtype=torch.bool)
    cut = int(fraction * 2**64)
    return torch.tensor([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
                         < cut for i in range(num_images)], dtype=torch.bool)


def top_alpha(activations: Tensor, alpha: float) -> Tensor:
    """Bool [N, K]: each unit's top ``alpha`` of the images (at least one), every image tied at the threshold
    included, and none where the unit is 0 when the ranking rule leaves its zeros out."""
    n = activations.shape[0]
    count = min(n, max(1, math.ceil(alpha * n)))
    # the zeros leave before the threshold is taken, as in the ranking rule (negative winners can still rank)
    candidates = activations.masked_fill(zeros_excluded(activations) & (activations == 0), -math.inf)
    threshold = candidates.topk(count, dim=0).values[-1]
    return (candidates >= threshold) & (candidates > -math.inf)


def f1_iou(predicted: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of two bool [N, K] matrices: F1 = 2TP / (2TP + FP + FN) and IoU = TP / (TP + FP + FN);
    NaN where both are empty."""
    tp = (predicted & present).sum(0).double()
    fp = (predicted & ~present).sum(0).double()
    fn = (~predicted & present).sum(0).double()
    union = tp + fp + fn
    f1 = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.nan)
    return f1, torch.where(union > 0, tp / union.clamp_min(1), torch.nan)


def otsu_threshold(values: Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a value histogram.

    Returns a value ``t``; the foreground is ``values > t``. A constant input returns its value (nothing is
    foreground).
    """
    v = values.detach().flatten().double()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    p = hist / hist.sum()
    centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = p.cumsum(0)
    mu = (p * centers).cumsum(0)
    w1 = 1 - w0
    between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1).clamp_min(1e-12)
    between[(w0 <= 0) | (w1 <= 1e-12)] = -1
    k = int(between.argmax())
    return float(lo + (k + 1) * (hi - lo) / bins)  # upper edge of the last background bin


def presence_of(signal: Tensor) -> Tensor:
    """Bool [N, M]: each column's present/absent split; above its minimum when the column holds at most two
    values (ground truth), else above its Otsu threshold (CLIP similarities as pseudo-labels)."""
    out = torch.zeros(signal.shape, dtype=torch.bool)
    for j in range(signal.shape[1]):
        col = signal[:, j].double().cpu()
        lo = col.min()
        if torch.unique(col).numel() <= 2:
            out[:, j] = col > lo
        else:
            out[:, j] = col > otsu_threshold(col)
    return out


def label_quality(activations: Tensor, signal: Tensor, label: Tensor, presence: Optional[Tensor] = None,
                  ) -> dict[str, Tensor]:
    """Per unit: Pearson(activation, signal[:, label]), AUPRC(activation, presence[:, label]) and F1/IoU at top-alpha.

    Computed on whatever images are given: pass the held-out ones (:func:`holdout_split`) for figures the
    label's choice did not see.

    Args:
        activations: [N images, K units] pooled activations.
        signal: [N images, M concepts] the concepts' per-image signal (the scorer's image-concept matrix, a
            tensor or a lazy ``EmbeddingProduct``: only the labels' columns are read).
        label: [K] long, the concept index of each unit's label; -1 for units without a label.
        presence: optional [N, M] binary presence; default :func:`presence_of` of the labels' columns.

    Returns:
        the :data:`QUALITY_FIELDS`: float64 [K], NaN where undefined (no label, a constant activation or
        signal, no presence, or a concept absent from every image).
    """
    if activations.ndim != 2 or len(signal.shape) != 2 or activations.shape[0] != signal.shape[0]:
        raise ValueError(f"activations {tuple(activations.shape)} and signal {tuple(signal.shape)} must be "
                         "[N, K] and [N, M] over the same images")
    if label.shape != (activations.shape[1],):
        raise ValueError(f"label must hold one concept index per unit ({activations.shape[1]}), got {tuple(label.shape)}")
    k = activations.shape[1]
    out = {name: torch.full((k,), math.nan, dtype=torch.float64) for name in QUALITY_FIELDS}
    has = (label >= 0).nonzero().flatten()
    if has.numel() == 0 or activations.shape[0] < 2:
        return out
    acts = activations[:, has].double().cpu()
    cols = label[has].cpu()
    target = _columns(signal, cols).double().cpu()
    with warnings.catch_warnings():  # a constant column: torchmetrics warns and returns NaN, which we keep
        warnings.simplefilter("ignore")
        corr = pearson_corrcoef(acts, target) if acts.shape[1] > 1 else pearson_corrcoef(acts[:, 0], target[:, 0])[None]
    out["label_corr"][has] = torch.where(_constant(acts) | _constant(target), torch.nan, corr.double())
    pos = (presence.cpu()[:, cols] > 0).long() if presence is not None else _columns_presence(signal, cols)
    with warnings.catch_warnings():  # a concept absent everywhere: warned about, NaN below
        warnings.simplefilter("ignore")
        if acts.shape[1] > 1:
            ap = multilabel_average_precision(acts.float(), pos, num_labels=acts.shape[1], average=None)
        else:
            ap = binary_average_precision(acts[:, 0].float(), pos[:, 0])
    ap = torch.as_tensor(ap, dtype=torch.float64).reshape(-1)
    out["label_auprc"][has] = torch.where(pos.sum(0) > 0, ap, torch.nan)
    out["label_base_rate"][has] = pos.double().mean(0)
    for suffix, alpha in TOP_ALPHAS.items():
        f1, iou = f1_iou(top_alpha(acts, alpha), pos > 0)
        out[f"label_f1_{suffix}"][has], out[f"label_iou_{suffix}"][has] = f1, iou
    return out


def presence_by_threshold(signal, cols: Tensor) -> bool:
    """Whether any of the ``cols`` columns is continuous, so :func:`presence_of` splits it by Otsu's threshold
    (a CLIP similarity, a pseudo-label) rather than reading annotations."""
    for j in torch.unique(cols).tolist():  # one column at a time, stopping at the first continuous one
        if torch.unique(_columns(signal, torch.tensor([j])).cpu()).numel() > 2:
            return True
    return False


def _columns_presence(signal: Tensor, cols: Tensor) -> Tensor:
    """:func:`presence_of` for the given columns only (each distinct column once), as long [N, len(cols)]."""
    uniq, inverse = torch.unique(cols, return_inverse=True)
    return presence_of(_columns(signal, uniq))[:, inverse].long()


def _columns(signal, cols: Tensor) -> Tensor:
    """signal[:, cols] for a tensor or for anything with ``columns`` (a lazy image-concept matrix)."""
    if isinstance(signal, Tensor):
        return signal.index_select(1, cols.to(signal.device))
    return signal.columns(cols)


def _constant(x: Tensor) -> Tensor:
    return (x.amax(0) - x.amin(0)) == 0
