"""Network Dissection (Bau, Zhou et al. 2017): IoU of thresholded activation maps against concept masks.

Torch only. Two streaming passes over the probe set, never holding all activation maps:

1. Per unit k, the threshold T_k: the top-``quantile`` value of its activations over every spatial position
   of every probe image. Ours is the exact r-th largest value, r = ceil(quantile * n) over the unit's n
   values (see :class:`TopQuantile`); NetDissect-Lite reads it from a streaming quantile sketch at
   ascending rank about (1 - quantile) * n (0.995 n), about one order statistic below ours.
2. Each unit's map is upsampled bilinearly to the mask resolution and binarised (M_k = map > T_k);
   intersection and union counts with every concept mask L_c are summed over images, and
   IoU(k, c) = inter(k, c) / union(k, c). A unit's label is argmax_c IoU; it is a *detector* when that IoU
   exceeds ``iou_threshold`` (0.04 in the paper).

The union follows NetDissect-Lite's ``tally`` (feature_operation.py), which counts an image only where the
concept's *category* is annotated under the unit's active pixels. Per image and unit, the category
cat is *seen* when M_k touches at least one pixel labelled with a concept of cat (image-level concepts,
texture and scene, are full planes, so they are seen whenever the unit fires in an image carrying one):

    inter(k, c) = sum_img |M_k & L_c|
    union(k, c) = sum_img [cat(c) seen by k in img] * |M_k|  +  sum_img |L_c|  -  inter(k, c)

The gate matters on Broden, which labels textures and scenes on part of the images only: without it every
image where a unit fires adds to the union of every texture and scene concept (measured on one texture
unit: IoU 0.122 ungated against NetDissect-Lite's 0.136). A mask source whose every pixel is annotated in
every category (``fully_annotated = True``, e.g. :class:`GeneratedMasks`: a background pixel is known to
show no shape) gates on "the unit fires in the image", which is the plain sum_img |M_k | L_c|.

Concept masks come from a *mask source* (see :class:`MaskSource`): the generated shapes data through
:class:`GeneratedMasks`, Broden through :class:`lwta_vision.datasets.broden.BrodenDataset`.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.labels import LayerLabels, NeuronRow
from lwta_vision.dissect.ranking import top_images as ranked_top_images
from lwta_vision.dissect.recording import _batch_inputs, capture, eval_mode, resolve_layers

# Largest float32 tensor (in elements) built at once when binarising upsampled maps: units are processed
# in chunks so that a batch of 2048-unit maps upsampled to 112x112 never needs gigabytes.
_CHUNK_ELEMENTS = 1 << 25


@runtime_checkable
class MaskSource(Protocol):
    """Per-pixel concept masks of the probe images, in probe order.

    ``masks(i)`` is bool ``[M, H, W]`` (numpy or torch), one plane per concept in ``concept_names``;
    image-level concepts (scene, texture) are given as full planes. Sources may also provide the faster
    ``present_masks(i) -> (LongTensor [m], bool [m, H, W])`` with only the concepts present (unique indices),
    which :func:`iou_dissect` prefers: Broden has ~1,200 concepts but a handful per image.

    Optional ``fully_annotated: bool`` (absent means False): True when every pixel of every image is
    annotated in every category, so that the union needs no per-category gate (see the module docstring).
    """

    concept_names: list[str]
    concept_categories: list[str]

    def __len__(self) -> int: ...

    def masks(self, i: int): ...


class GeneratedMasks:
    """Mask source over anything with ``sample(i)["masks"]`` and concept attributes (``ShapesConceptDataset``).

    Works on wrappers that forward attributes (e.g. a first-N view of the dataset): the length is the
    wrapper's own. Every pixel is annotated in every category (``fully_annotated``): a pixel outside all
    shape masks is known to show no shape.
    """

    fully_annotated = True

    def __init__(self, dataset):
        missing = [a for a in ("sample", "concept_names", "concept_categories") if not hasattr(dataset, a)]
        if missing:
            raise TypeError(f"{type(dataset).__name__} lacks {', '.join(missing)}; GeneratedMasks needs a dataset "
                            "like ShapesConceptDataset whose sample(i) returns per-concept 'masks'")
        self.dataset = dataset
        self.concept_names = list(dataset.concept_names)
        self.concept_categories = list(dataset.concept_categories)

    def __len__(self) -> int:
        return len(self.dataset)

    def masks(self, i: int) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(self.dataset.sample(i)["masks"]), dtype=torch.bool)


def mask_source_for(dataset) -> MaskSource:
    """The mask source of a probe dataset: the dataset itself if it has ``masks`` (Broden), else
    :class:`GeneratedMasks` if it has ``sample`` (the shapes data)."""
    if hasattr(dataset, "masks") and hasattr(dataset, "concept_names"):
        return dataset
    if hasattr(dataset, "sample") and hasattr(dataset, "concept_names"):
        return GeneratedMasks(dataset)
    raise TypeError(f"{type(dataset).__name__} has no concept masks: IoU dissection needs a probe set with "
                    "per-pixel annotations (the generated shapes data, or Broden via BrodenDataset)")


def _present_masks(source, i: int) -> tuple[Tensor, Tensor]:
    """(concept indices [m], bool masks [m, H, W]) of the concepts present in image i."""
    if hasattr(source, "present_masks"):
        idx, m = source.present_masks(i)
        idx, m = torch.as_tensor(idx, dtype=torch.long), torch.as_tensor(m, dtype=torch.bool)
        if idx.numel() != idx.unique().numel():
            raise ValueError(f"present_masks({i}) of {type(source).__name__} repeats a concept index; merge its planes")
    else:
        m = torch.as_tensor(np.ascontiguousarray(source.masks(i)), dtype=torch.bool)
        num = len(source.concept_names)
        if m.ndim != 3 or m.shape[0] != num:
            raise ValueError(f"masks({i}) of {type(source).__name__} has shape {tuple(m.shape)}; expected "
                             f"[{num} concepts, H, W]")
        idx = m.flatten(1).any(1).nonzero().flatten()
        m = m[idx]
    if m.ndim != 3 or m.shape[0] != idx.numel():
        raise ValueError(f"concept masks of image {i} have shape {tuple(m.shape)} for {idx.numel()} concepts")
    return idx, m


# --------------------------------------------------------------------------------------------- thresholds
def top_rank(quantile: float, num_values: int) -> int:
    """r = ceil(quantile * n), at least 1: T_k is the r-th largest of the unit's n activations.

    The product is rounded to 9 decimals before the ceiling so that e.g. 0.005 * 200 counts as exactly 1.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}; Network Dissection uses 0.005")
    return max(1, math.ceil(round(quantile * num_values, 9)))


class TopQuantile:
    """Exact streaming upper quantile per unit: keep the top ``ceil(quantile * capacity)`` values per row.

    Definition: for a unit with n values, T = the r-th largest value, r = ``top_rank(quantile, n)``; so
    exactly ``r - 1`` values (fewer with ties) lie strictly above T, the ``quantile`` fraction rounded down.
    ``torch.quantile(x, 1 - quantile)`` (linear interpolation) differs from T by at most the gap between T and
    its neighbouring order statistics: it lies in [x_(r+1), x_(r-1)] (r-th largest = x_(r)).

    Memory is ``K * ceil(quantile * capacity)`` values (0.5 % of the full activation tensor at the default
    quantile). ``capacity`` must be known in advance (images x positions per image); fewer values than
    that are fine (the rank is taken on what was seen), more is an error because the buffer is no longer
    guaranteed to hold the r-th largest.
    """

    def __init__(self, quantile: float, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.quantile, self.capacity = quantile, int(capacity)
        self.keep = top_rank(quantile, self.capacity)
        self.buffer: Optional[Tensor] = None
        self.seen = 0

    def update(self, values: Tensor) -> None:
        """Add ``values [K, n]`` (n values of each of K units)."""
        self.seen += values.shape[1]
        if self.seen > self.capacity:
            raise ValueError(f"saw {self.seen} values per unit but the buffer was sized for {self.capacity}; "
                             "pass the true total (num_positions_total = images x positions per image)")
        cand = values if self.buffer is None else torch.cat([self.buffer, values], 1)
        if cand.shape[1] > self.keep:
            cand = cand.topk(self.keep, dim=1, sorted=False).values
        self.buffer = cand

    def threshold(self) -> Tensor:
        """T [K]: the r-th largest value per unit, r = ``top_rank(quantile, seen)``."""
        if self.buffer is None:
            raise ValueError("no values were added")
        r = top_rank(self.quantile, self.seen)
        return self.buffer.topk(r, dim=1).values[:, -1]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _spatial_output(out, layer: str) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim != 4:
        raise ValueError(f"IoU needs spatial maps; layer {layer!r} outputs shape {tuple(out.shape)}, expected "
                         "[N, C, H, W]: choose a convolutional layer (e.g. a ResNet's layer4)")
    return out.float()


def _iterate(loader: Iterable, progress: bool, desc: str) -> Iterable:
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False)


@dataclass
class _FirstPass:
    thresholds: Tensor  # [K]
    win_rate: Tensor  # [K] fraction of positions where the unit is non-zero
    input_rate: Tensor  # [K] fraction of images where it is non-zero anywhere
    top_indices: list[list[int]]  # per unit, the images with the highest per-image max (ranking rule)
    num_images: int


def _first_pass(model, layer, loader, quantile, num_positions_total, device, top_images=10,
                progress=False) -> _FirstPass:
    top_rank(quantile, 1)  # validate before touching data
    resolve_layers(model, [layer])
    device = device or _model_device(model)
    acc: Optional[TopQuantile] = None
    wins = inputs = 0
    peaks: list[Tensor] = []
    ids: list[Tensor] = []
    n_images = 0
    with torch.no_grad(), eval_mode(model), capture(model, [layer]) as outputs:
        for batch in _iterate(loader, progress, f"IoU thresholds {layer}"):
            x, idx = _batch_inputs(batch)
            if idx is None:
                idx = torch.arange(n_images, n_images + x.shape[0])
            model(x.to(device, non_blocking=True))
            out = _spatial_output(outputs.pop(layer), layer)
            b, k = out.shape[:2]
            if acc is None:
                total = num_positions_total
                if total is None:
                    try:
                        total = len(loader.dataset) * out.shape[2] * out.shape[3]
                    except (AttributeError, TypeError):
                        raise ValueError("cannot tell how many images the loader holds; pass num_positions_total "
                                         "(images x positions per image)") from None
                acc = TopQuantile(quantile, total)
            acc.update(out.transpose(0, 1).reshape(k, -1))
            nz = (out != 0).flatten(2)
            wins = wins + nz.sum((0, 2)).double()
            inputs = inputs + nz.any(2).sum(0).double()
            peaks.append(out.amax((2, 3)).float().cpu())
            ids.append(idx.cpu().long())
            n_images += b
    if acc is None:
        raise ValueError("the probe loader yielded no images")
    # the ranking rule over every image's peak: no image where the unit is 0, ties all in
    shown = ranked_top_images(torch.cat(peaks), top_images, ids=torch.cat(ids))
    return _FirstPass(acc.threshold(), (wins / acc.seen).float().cpu(), (inputs / n_images).float().cpu(),
                      shown, n_images)


def streaming_thresholds(
    model: nn.Module,
    layer: str,
    loader: Iterable,
    quantile: float = 0.005,
    num_positions_total: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Per-unit Network Dissection thresholds of a conv layer, streamed over a loader.

    T_k is the r-th largest activation of unit k over all positions of all images, r = ceil(quantile * n)
    (see :class:`TopQuantile`); exact, with memory K * r.

    Args:
        model: the network; ``layer`` is a module path in it.
        loader: batches of ``(inputs, image_index)`` or inputs.
        quantile: upper fraction of activations above the threshold (0.005 in the paper).
        num_positions_total: images x positions per image; defaults to ``len(loader.dataset)`` x the
            layer's H*W.
        device: where the model runs (default: its parameters' device).

    Returns:
        Tensor [K] on the model's device.
    """
    return _first_pass(model, layer, loader, quantile, num_positions_total, device).thresholds


# -------------------------------------------------------------------------------------------- IoU pass
class _InputsAndMasks(Dataset):
    def __init__(self, inputs: Dataset, source):
        self.inputs, self.source = inputs, source

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        x, idx = self.inputs[i]
        idx = int(idx)  # the probe index, which the mask source is keyed by
        cidx, m = _present_masks(self.source, idx)
        return x, idx, cidx, m


def _collate(items):
    xs, ids, cidx, masks = zip(*items)
    return torch.stack(xs), torch.as_tensor(ids), list(cidx), list(masks)


def _accumulate(out: Tensor, thresholds: Tensor, cidx: list[Tensor], masks: list[Tensor], num_concepts: int,
                inter: Tensor, act_count: Tensor, mask_count: Tensor, cat_of: Optional[Tensor] = None,
                units_cat: Optional[Tensor] = None) -> None:
    """Add one batch's intersection [K, M+1], per-unit and per-concept pixel counts (column M is padding).

    With ``cat_of`` ([M+1] long, concept -> category, padding -> the dummy category C) also add the gated
    unit counts ``units_cat`` [K, C+1]: per image, unit k's active pixels go to category cat when they
    touch a pixel labelled with a concept of cat (NetDissect-Lite's ``tally_units_cat``).
    """
    device = out.device
    k_units = out.shape[1]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for b, m in enumerate(masks):
        by_size[tuple(m.shape[-2:])].append(b)
    for (h, w), rows in by_size.items():
        p = h * w
        m_max = max(1, max(cidx[b].numel() for b in rows))
        labels = torch.zeros(len(rows), m_max, p, device=device)
        cols = torch.full((len(rows), m_max), num_concepts, dtype=torch.long, device=device)
        for j, b in enumerate(rows):
            n = cidx[b].numel()
            if n:
                labels[j, :n] = masks[b].to(device).flatten(1).float()
                cols[j, :n] = cidx[b].to(device)
        onehot = None
        if cat_of is not None:  # [B, m_max, C+1]: which category each slot's concept belongs to
            onehot = F.one_hot(cat_of[cols], units_cat.shape[1]).float()
        cols = cols.flatten()
        mask_count.index_add_(0, cols, labels.sum(2).flatten().double())
        maps = out[torch.as_tensor(rows, device=device)]
        chunk = max(1, _CHUNK_ELEMENTS // (len(rows) * p))
        for k0 in range(0, k_units, chunk):
            k1 = min(k_units, k0 + chunk)
            up = maps[:, k0:k1]
            if up.shape[-2:] != (h, w):
                up = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)
            binary = (up > thresholds[k0:k1, None, None]).flatten(2).float()  # [B, kc, P]
            act_count[k0:k1] += binary.sum((0, 2)).double()
            both = torch.bmm(binary, labels.transpose(1, 2))  # [B, kc, m_max], exact integer counts
            inter[k0:k1].index_add_(1, cols, both.permute(1, 0, 2).reshape(k1 - k0, -1).double())
            if onehot is not None:
                seen = torch.bmm(both, onehot) > 0  # [B, kc, C+1]: category annotated under M_k
                act_img = binary.sum(2).double()  # [B, kc]
                units_cat[k0:k1] += torch.einsum("bk,bkc->kc", act_img, seen.double())


def iou_matrix(
    model: nn.Module,
    layer: str,
    loader: Iterable,
    thresholds: Tensor,
    num_concepts: int,
    device: Optional[torch.device] = None,
    progress: bool = False,
    categories: Optional[Tensor] = None,
    fully_annotated: bool = False,
) -> Tensor:
    """IoU [K, M] of a layer's binarised maps against concept masks, over batches of
    ``(inputs, image_index, concept_indices list, present masks list)``.

    The union is NetDissect-Lite's (see the module docstring): per image, unit k's active pixels count
    towards the union of concept c only when they touch a pixel labelled with a concept of c's category,
    union(k, c) = sum_img [cat(c) seen] * |M_k| + sum_img |L_c| - inter(k, c); Broden labels textures and
    scenes on part of the images only (measured on one texture unit: 0.122 ungated vs NetDissect-Lite's
    0.136). ``thresholds`` are exact r-th largest values (r = ceil(quantile * n), :class:`TopQuantile`),
    where NetDissect-Lite's quantile sketch lands about one order statistic lower.

    Args:
        thresholds: T [K], one per unit of ``layer``.
        num_concepts: M.
        categories: [M] long, the category index of each concept (gates the union). None, or
            ``fully_annotated=True`` (every pixel annotated in every category), gives the ungated union
            sum_img |M_k | L_c| = sum |M_k| + sum |L_c| - inter.

    Counts are exact: 0/1 products summed in float32 per image (exact below 2^24 pixels), accumulated in
    float64. A (unit, concept) pair with an empty union scores 0.
    """
    device = device or _model_device(model)
    thresholds = thresholds.to(device).float()
    k_units = thresholds.numel()
    inter = torch.zeros(k_units, num_concepts + 1, dtype=torch.float64, device=device)
    act_count = torch.zeros(k_units, dtype=torch.float64, device=device)
    mask_count = torch.zeros(num_concepts + 1, dtype=torch.float64, device=device)
    cat_of = units_cat = None
    if categories is not None and not fully_annotated:
        categories = torch.as_tensor(categories, dtype=torch.long).flatten()
        if categories.numel() != num_concepts or (num_concepts and categories.min() < 0):
            raise ValueError(f"categories must hold a non-negative category index for each of the {num_concepts} "
                             f"concepts; got {categories.numel()} values")
        num_cats = int(categories.max()) + 1 if num_concepts else 0
        cat_of = torch.cat([categories, torch.tensor([num_cats])]).to(device)  # padding -> dummy category
        units_cat = torch.zeros(k_units, num_cats + 1, dtype=torch.float64, device=device)
    with torch.no_grad(), eval_mode(model), capture(model, [layer]) as outputs:
        for x, _ids, cidx, masks in _iterate(loader, progress, f"IoU {layer}"):
            model(x.to(device, non_blocking=True))
            out = _spatial_output(outputs.pop(layer), layer)
            if out.shape[1] != k_units:
                raise ValueError(f"layer {layer!r} has {out.shape[1]} units but {k_units} thresholds were given")
            _accumulate(out, thresholds, cidx, masks, num_concepts, inter, act_count, mask_count, cat_of,
                        units_cat)
    inter, mask_count = inter[:, :num_concepts], mask_count[:num_concepts]
    unit_part = act_count[:, None] if units_cat is None else units_cat[:, cat_of[:num_concepts]]
    union = unit_part + mask_count[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return iou.float().cpu()


def iou_dissect(
    model: nn.Module,
    layer: str,
    probe: ProbeSet,
    masks: Optional[MaskSource] = None,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    batch_size: int = 64,
    device: Optional[torch.device] = None,
    progress: bool = False,
    num_workers: int = 0,
    top_images: int = 10,
) -> tuple[LayerLabels, Tensor]:
    """Network Dissection of one conv layer: per unit, the concept whose masks best overlap its top activations.

    Thresholds are the exact r-th largest activation per unit, r = ceil(quantile * n) (:class:`TopQuantile`);
    NetDissect-Lite's streaming quantile sketch reads ascending rank about (1 - quantile) * n (0.995 n),
    about one order statistic below. The IoU union is NetDissect-Lite's: an image adds unit k's active
    pixels to the union of concept c only when they touch a pixel labelled in c's category (an image-level
    texture or scene label counts as the whole image), because Broden labels textures and scenes on part of
    the images only (measured on one texture unit: 0.122 ungated vs NetDissect-Lite's 0.136). Sources with
    ``fully_annotated = True`` (the generated shapes data) skip the gate: the plain sum |M_k | L_c|.

    Args:
        model: the network; ``layer`` a module path in it whose output is [N, C, H, W].
        probe: the probe images (in the same order as ``masks``).
        masks: the concept masks (:class:`MaskSource`); default ``mask_source_for(probe.dataset)``.
        quantile: fraction of a unit's activations (over all positions and images) above its threshold.
        iou_threshold: a unit is a detector when its best IoU exceeds this (0.04 in the paper).
        batch_size, num_workers: of the two probe loaders (mask decoding runs in the workers).
        device: where the model runs (default: its parameters' device).
        top_images: per unit, the probe images with the highest peak activation, for reports.

    Returns:
        ``(labels, iou)``: :class:`LayerLabels` whose rows carry the best IoU as ``score`` (0 and no label
        for units with no overlap at all), and the full IoU matrix [K, M].
    """
    source = mask_source_for(probe.dataset) if masks is None else masks
    concepts = list(source.concept_names)
    categories = list(source.concept_categories)
    if len(categories) != len(concepts):
        raise ValueError(f"mask source has {len(concepts)} concept names but {len(categories)} categories")
    if len(source) != len(probe):
        raise ValueError(f"mask source has {len(source)} images but probe set {probe.name!r} has {len(probe)}; "
                         "they must list the same images in the same order")
    if len(probe) == 0:
        raise ValueError(f"probe set {probe.name!r} has no images")
    resolve_layers(model, [layer])
    device = device or _model_device(model)
    inputs = probe.network_dataset()
    loader = DataLoader(inputs, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    first = _first_pass(model, layer, loader, quantile, None, device, top_images, progress)
    mask_loader = DataLoader(_InputsAndMasks(inputs, source), batch_size=batch_size, shuffle=False,
                             num_workers=num_workers, collate_fn=_collate)
    category_index = {c: j for j, c in enumerate(dict.fromkeys(categories))}
    cat_ids = torch.tensor([category_index[c] for c in categories], dtype=torch.long)
    iou = iou_matrix(model, layer, mask_loader, first.thresholds, len(concepts), device, progress,
                     categories=cat_ids, fully_annotated=bool(getattr(source, "fully_annotated", False)))
    labels = _layer_labels(layer, iou, concepts, categories, first, quantile, iou_threshold)
    return labels, iou


def _layer_labels(layer, iou, concepts, categories, first: _FirstPass, quantile, iou_threshold) -> LayerLabels:
    k_units = iou.shape[0]
    top_s, top_j = iou.topk(min(3, len(concepts)), dim=1)
    active = first.win_rate > 0
    rows = []
    for u in range(k_units):
        pairs = [(concepts[j], s) for j, s in zip(top_j[u].tolist(), top_s[u].tolist()) if s > 0]
        rows.append(NeuronRow(
            layer=layer, unit=u,
            label=pairs[0][0] if pairs else None,
            score=pairs[0][1] if pairs else 0.0,
            next_labels=[c for c, _ in pairs[1:]], next_scores=[s for _, s in pairs[1:]],
            win_rate=float(first.win_rate[u]), input_rate=float(first.input_rate[u]),
            active=bool(active[u]), top_images=first.top_indices[u],
        ))
    category_of = dict(zip(concepts, categories))
    detectors = [r for r in rows if r.label is not None and r.score > iou_threshold]
    per_category = {c: 0 for c in dict.fromkeys(categories)}
    for r in detectors:
        per_category[category_of[r.label]] += 1
    summary = {
        "layer": layer,
        "units": k_units,
        "active_units": int(active.sum()),
        "images": first.num_images,
        "method": "iou",
        "quantile": quantile,
        "iou_threshold": iou_threshold,
        "detectors": len(detectors),
        "detector_fraction": len(detectors) / k_units if k_units else 0.0,
        "unique_concepts": len({r.label for r in detectors}),
        "per_category": per_category,
        "mean_iou": sum(r.score for r in detectors) / len(detectors) if detectors else None,  # None: no detector
        "best_iou": max((r.score for r in rows if r.score is not None), default=0.0),
    }
    return LayerLabels(layer=layer, rows=rows, summary=summary, scores=iou)


# ------------------------------------------------------------------------------------------- agreement
def _norm_label(name: Optional[str]) -> Optional[str]:
    """Lower case, ``_`` as space, Broden's category suffixes (``red-c``, ``street-s``) dropped."""
    if name is None:
        return None
    name = " ".join(str(name).lower().replace("_", " ").split())
    return re.sub(r"-[cs]$", "", name)


def label_agreement(
    text_labels: LayerLabels,
    iou_labels: LayerLabels,
    iou_threshold: Optional[float] = None,
    normalize: Callable[[Optional[str]], Optional[str]] = _norm_label,
) -> dict:
    """How often a text-based label (CLIP-Dissect style) names the same concept as Network Dissection.

    Only IoU detectors count: a unit whose best IoU is below the threshold has no reliable IoU label.

    Returns:
        dict with ``detectors``, ``text_labelled`` (detectors that also have a text label), ``agree``,
        ``agreement`` (agree / detectors, None without detectors), ``agreement_labelled`` (agree /
        text_labelled, None without any) and ``agreeing_units``.
    """
    if len(text_labels.rows) != len(iou_labels.rows):
        raise ValueError(f"text labels cover {len(text_labels.rows)} units of {text_labels.layer!r} but IoU labels "
                         f"{len(iou_labels.rows)} of {iou_labels.layer!r}; compare the same layer")
    thr = iou_labels.summary.get("iou_threshold", 0.04) if iou_threshold is None else iou_threshold
    text = {r.unit: r for r in text_labels.rows}
    detectors = [r for r in iou_labels.rows if r.label is not None and r.score is not None and r.score > thr]
    labelled = [r for r in detectors if text[r.unit].label is not None]
    agreeing = [r.unit for r in labelled if normalize(text[r.unit].label) == normalize(r.label)]
    return {
        "layer": iou_labels.layer,
        "iou_threshold": thr,
        "detectors": len(detectors),
        "text_labelled": len(labelled),
        "agree": len(agreeing),
        "agreement": len(agreeing) / len(detectors) if detectors else None,  # None: no detector to agree with
        "agreement_labelled": len(agreeing) / len(labelled) if labelled else None,
        "agreeing_units": agreeing,
    }
