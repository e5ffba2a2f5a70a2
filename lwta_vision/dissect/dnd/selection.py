"""Describe-and-Dissect (Bai et al., 2024): describe a neuron in free text, without a fixed vocabulary.

Three stages, each a function with its models passed in (torch only; the model wrappers live in
:mod:`lwta_vision.dissect.dnd.generative` and import transformers/diffusers lazily):

1. :func:`attention_exemplars` - the neuron's top probe images plus crops of the regions that excite it
   (Otsu threshold of the upsampled activation map, boxes of its connected regions), re-ranked by the
   neuron's activation; the best ``keep`` survive.
2. :func:`candidate_concepts` - captions of those images, summarised by a language model into short
   concepts, once per round with the captions shuffled.
3. :func:`select_concepts` - images of each candidate (generated, or retrieved from a pool) are ranked
   among the real top images by the neuron's activation; a candidate whose images rank high, and look
   like the real top images (CLIP image-image similarity), wins.

Everything random is seeded from one ``seed``, so a description is reproducible.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.evaluate.quality import otsu_threshold
from lwta_vision.dissect.labels import LayerLabels, NeuronRow
from lwta_vision.dissect.ranking import top_images as ranked_top_images
from lwta_vision.dissect.recording import LayerRecord, order_by_image, record_activations, spatial_maps

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive


# ---------------------------------------------------------------------------------------------- stage 1
def connected_components(mask: Tensor) -> Tensor:
    """Label the 8-connected regions of a boolean ``[H, W]`` mask: int64 labels, 0 = background.

    Label propagation by 3x3 max-pooling until nothing changes: pure torch, no OpenCV/SciPy dependency;
    iterations are bounded by the longest path inside a region.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    m = mask.bool()
    h, w = m.shape
    lab = torch.where(m, torch.arange(1, h * w + 1, dtype=torch.float64).view(h, w), torch.zeros((), dtype=torch.float64))
    while True:
        new = F.max_pool2d(lab[None, None], 3, stride=1, padding=1)[0, 0] * m
        if torch.equal(new, lab):
            break
        lab = new
    _, dense = torch.unique(lab, return_inverse=True)  # 0 stays 0 because it sorts first (when present)
    return dense if not m.all() else dense + 1


def box_iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def attention_boxes(
    amap: Tensor,
    size: tuple[int, int],
    max_crops: int = 4,
    max_crop_iou: float = 0.5,
    max_image_iou: float = 0.8,
) -> list[Box]:
    """Boxes around the regions of one activation map that excite the neuron (DnD's attention cropping).

    The ``[h, w]`` map is upsampled (bilinear) to the image ``size = (H, W)``, thresholded with Otsu, and the
    bounding box of each connected region is a candidate, strongest region (summed activation) first. A box
    is kept when its IoU with every kept box is at most ``max_crop_iou`` and with the whole image below
    ``max_image_iou`` (a crop of almost everything adds nothing); at most ``max_crops`` are kept.
    """
    H, W = size
    up = F.interpolate(amap.detach().float()[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    t = otsu_threshold(up)
    fg = up > t
    if not fg.any():
        return []
    labels = connected_components(fg)
    n = int(labels.max())
    strength = torch.zeros(n + 1, dtype=torch.float64).index_add_(0, labels.flatten(), up.flatten().double())
    full = (0, 0, W, H)
    kept: list[Box] = []
    for r in strength[1:].argsort(descending=True).tolist():
        ys, xs = torch.nonzero(labels == r + 1, as_tuple=True)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if box_iou(box, full) >= max_image_iou:
            continue
        if all(box_iou(box, k) <= max_crop_iou for k in kept):
            kept.append(box)
            if len(kept) == max_crops:
                break
    return kept


@dataclass
class Exemplar:
    """An image that excites a neuron: a probe image (``box=None``) or a crop of one."""

    image: Image.Image
    source: int
    box: Optional[Box]
    activation: float
    caption: str = ""


def layer_activations(
    model: nn.Module,
    layer: str,
    images: Sequence[Image.Image],
    transform: Callable,
    grayscale: bool = False,
    pooling: str = "mean",
    token_pooling: str = "cls",
    device: Optional[torch.device] = None,
    batch_size: int = 64,
) -> Tensor:
    """Pooled activations ``[len(images), K]`` of one layer on arbitrary PIL images (crops, generated)."""
    if not images:
        return torch.empty(0)
    loader = DataLoader(ProbeSet(list(images), transform, "transient", grayscale).network_dataset(),
                        batch_size=batch_size, shuffle=False)
    return record_activations(model, [layer], loader, pooling, token_pooling, top_k=1, device=device)[layer].pooled


def attention_exemplars(
    model: nn.Module,
    layer: str,
    probe: ProbeSet,
    record: LayerRecord,
    units: Sequence[int],
    top_images: int = 10,
    keep: int = 10,
    max_crops: int = 4,
    pooling: str = "mean",
    token_pooling: str = "cls",
    device: Optional[torch.device] = None,
    batch_size: int = 64,
) -> dict[int, list[Exemplar]]:
    """Stage 1 for several units of a layer: top probe images plus attention crops, best ``keep`` by activation.

    Crops are resized back to their image's size before the network sees them (a network trained at 32 px
    must get 32 px). Non-spatial layers (fc, ViT tokens) get no crops, as in DnD.
    """
    # the ranking rule: never an image where the unit is 0 (an LWTA loss), ties at the cut all in
    units = list(units)
    shown = ranked_top_images(record.pooled[:, units], top_images, ids=record.image_ids)
    tops = dict(zip(units, shown))
    by_index = sorted({i for v in tops.values() for i in v})
    raw = {i: probe.raw(i) for i in by_index}
    maps = None
    if record.spatial and max_crops > 0 and by_index:
        maps = spatial_maps(model, layer, probe.network_dataset(), by_index, device, batch_size)
        pos = {i: p for p, i in enumerate(by_index)}
    crops: list[Exemplar] = []
    owner: list[int] = []
    for u in units:
        for i in tops[u]:
            if maps is None:
                continue
            img = raw[i]
            for box in attention_boxes(maps[pos[i], u], (img.height, img.width), max_crops):
                crop = img.crop(box).resize(img.size, Image.BILINEAR)
                crops.append(Exemplar(crop, i, box, 0.0))
                owner.append(u)
    if crops:
        acts = layer_activations(model, layer, [c.image for c in crops], probe.transform, probe.grayscale,
                                 pooling, token_pooling, device, batch_size)
        for c, u, a in zip(crops, owner, acts):
            c.activation = float(a[u])
    pooled_row = {int(i): r for r, i in enumerate(record.image_ids.tolist())} if record.image_ids is not None else None
    out = {}
    for u in units:
        ex = []
        for i in tops[u]:
            row = pooled_row[i] if pooled_row is not None else i
            ex.append(Exemplar(raw[i], i, None, float(record.pooled[row, u])))
        ex += [c for c, o in zip(crops, owner) if o == u]
        ex.sort(key=lambda e: -e.activation)  # stable: originals win ties with their own crops
        out[u] = ex[:keep]
    return out


# ---------------------------------------------------------------------------------------------- stage 2
class Captioner(Protocol):
    def __call__(self, exemplars: Sequence[Exemplar], seed: int) -> list[str]: ...


class Summarizer(Protocol):
    def __call__(self, captions: Sequence[str], seed: int) -> str: ...


def clean_concept(text: str, max_words: int = 5) -> str:
    """A language model's answer reduced to a short lower-case concept (first line, no quotes or prefix)."""
    import re

    for line in str(text).splitlines():
        line = line.strip()
        if line:
            break
    else:
        return ""
    line = re.sub(r"^(concept|answer|summary|label)\s*[:\-]\s*", "", line, flags=re.I)
    line = re.sub(r"[^a-zA-Z0-9\s\-']", " ", line).lower()
    words = [w.strip("-'") for w in line.split()]
    words = [w for w in words if w]
    return " ".join(words[:max_words])


def candidate_concepts(captions: Sequence[str], summarizer: Summarizer, rounds: int = 5, seed: int = 0) -> list[str]:
    """Stage 2b: summarise the captions ``rounds`` times, shuffled each time; unique non-empty concepts."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out: list[str] = []
    for r in range(rounds):
        order = list(captions)
        random.Random(seed * 1000 + r).shuffle(order)
        c = clean_concept(summarizer(order, seed * 1000 + r))
        if c and c not in out:
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------- stage 3
class ConceptImages(Protocol):
    """Images showing a concept: a text-to-image generator, or retrieval from an image pool."""

    def __call__(self, concept: str, n: int, seed: int, exclude: Sequence[int] = ()) -> list[Image.Image]:
        """``n`` images of ``concept``; a retriever skips pool indices in ``exclude`` (a generator ignores it)."""
        ...


class ProbeRetriever:
    """Concept images retrieved from a pool of real images by a scorer (CLIP, or the ground truth).

    What differs from DnD's generated images: a retrieved image shows the concept in context, with
    whatever else the pool's images contain, and the pool bounds what can be shown. Images among
    ``exclude`` (the neuron's own top images) are skipped, so a candidate cannot win by returning them.
    With a ground-truth scorer a phrase retrieves the images annotated with all of its known words ("red
    circle": red and circle) and a phrase with none retrieves nothing (the candidate then ranks last).
    """

    def __init__(self, scorer, pool: ProbeSet, template: str = "{}"):
        self.scorer, self.pool, self.template = scorer, pool, template

    def _similarity(self, concept: str) -> Optional[Tensor]:
        names = getattr(self.scorer, "concept_names", None)
        if names is None:  # CLIP: any text; pool embeddings cached once, candidate texts are transient
            text = self.scorer.encode_text([self.template.format(concept)])
            return (self.scorer.image_embeddings(self.pool) @ text.T)[:, 0].float()
        # an annotated vocabulary (ground truth): a phrase means all of its annotated words ("red circle")
        known = {str(c).lower(): c for c in names}
        words = [known[w] for w in concept.lower().split() if w in known]
        if concept.lower() in known:
            words = [known[concept.lower()]]
        if not words:
            return None
        sim = self.scorer.similarity(self.pool, words).float().prod(1) ** (1 / len(words))
        return torch.where(sim > 0, sim, torch.tensor(-float("inf")))  # absent: never retrieved

    def indices(self, concept: str, n: int, seed: int, exclude: Sequence[int] = ()) -> list[int]:
        """Pool indices of the ``n`` images most similar to ``concept`` (see the class docstring)."""
        sim = self._similarity(concept)
        if sim is None:
            return []
        if exclude:
            sim[torch.as_tensor(list(exclude), dtype=torch.long)] = -float("inf")
        n = min(n, int(torch.isfinite(sim).sum()))
        # ties (e.g. ground-truth presence) are broken by a seeded random order, not by the pool's order
        g = torch.Generator().manual_seed(seed)
        jitter = torch.rand(sim.shape, generator=g) * 1e-6
        return (sim + jitter).topk(n).indices.tolist()

    def __call__(self, concept: str, n: int, seed: int, exclude: Sequence[int] = ()) -> list[Image.Image]:
        return [self.pool.raw(i) for i in self.indices(concept, n, seed, exclude)]


def rank_scores(real: Tensor, candidates: Sequence[Tensor], beta: int = 5) -> Tensor:
    """DnD's rank score per candidate: mean squared 1-based rank of its ``beta`` best images (lower = better).

    All images (the real top images and every candidate's images) are sorted together by the neuron's
    activation, descending; ties share the better rank.
    """
    acts = torch.cat([real.float()] + [c.float() for c in candidates])
    # rank = 1 + number of images strictly above
    scores = []
    for c in candidates:
        if c.numel() == 0:
            scores.append(float("inf"))
            continue
        ranks = 1 + (acts[None, :] > c.float()[:, None]).sum(1).double()
        best = ranks.sort().values[:beta]
        scores.append(float((best ** 2).mean()))
    return torch.tensor(scores, dtype=torch.float64)


@dataclass
class Selection:
    concept: str
    final: float
    rank_score: float
    weight: float


def select_concepts(
    concepts: Sequence[str],
    real_acts: Tensor,
    concept_acts: Sequence[Tensor],
    real_emb: Optional[Tensor] = None,
    concept_embs: Optional[Sequence[Tensor]] = None,
    beta: int = 5,
    keep: int = 3,
) -> list[Selection]:
    """Stage 3 (pure): rank candidates by :func:`rank_scores`, weight by image-image similarity, keep the best.

    ``final = (position from the bottom of the rank-score order) x weight``, where the weight is the mean
    cosine similarity between the real top images' embeddings ``real_emb [R, d]`` and the candidate's
    ``beta`` highest-activating images' embeddings. Without embeddings every weight is 1 (rank order only).
    """
    if len(concepts) != len(concept_acts):
        raise ValueError(f"{len(concepts)} concepts but {len(concept_acts)} activation vectors")
    if not concepts:
        return []
    rs = rank_scores(real_acts, concept_acts, beta)
    order = sorted(range(len(concepts)), key=lambda j: (rs[j].item(), j))
    position = {j: len(concepts) - p for p, j in enumerate(order)}  # best rank score -> len(concepts)
    out = []
    for j, c in enumerate(concepts):
        weight = 1.0
        if real_emb is not None and concept_embs is not None and concept_acts[j].numel():
            top = concept_acts[j].argsort(descending=True)[:beta]
            e = F.normalize(concept_embs[j][top].float(), dim=-1)
            weight = float((F.normalize(real_emb.float(), dim=-1) @ e.T).mean())
        if not torch.isfinite(rs[j]):
            weight = 0.0
        out.append(Selection(c, position[j] * weight, float(rs[j]), weight))
    out.sort(key=lambda s: -s.final)
    return out[:keep]


# ---------------------------------------------------------------------------------------------- whole unit
@dataclass
class UnitDescription:
    unit: int
    exemplars: list[Exemplar]
    candidates: list[str]
    selection: list[Selection]
    win_rate: float = 0.0
    input_rate: float = 0.0
    active: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> Optional[str]:
        return self.selection[0].concept if self.selection else None


def describe_layer(
    model: nn.Module,
    layer: str,
    probe: ProbeSet,
    record: LayerRecord,
    captioner: Captioner,
    summarizer: Optional[Summarizer],
    concept_images: ConceptImages,
    image_embedder: Optional[Callable[[Sequence[Image.Image]], Tensor]] = None,
    units: Optional[Sequence[int]] = None,
    rounds: int = 5,
    beta: int = 5,
    top_images: int = 10,
    keep_images: int = 10,
    num_concept_images: int = 10,
    max_crops: int = 4,
    seed: int = 0,
    candidates_fn: Optional[Callable[[int, list[Exemplar]], list[str]]] = None,
    pooling: str = "mean",
    token_pooling: str = "cls",
    device: Optional[torch.device] = None,
    batch_size: int = 64,
    progress: bool = False,
    unit_chunk: int = 64,
) -> list[UnitDescription]:
    """Describe-and-Dissect for ``units`` of one layer (default: every unit that won on the probe set).

    ``candidates_fn(unit, captioned exemplars)`` replaces the summariser when given (e.g. to measure the
    selection stage alone). Units that never won are reported inactive without running the models. Stage 1
    runs ``unit_chunk`` units at a time, so memory does not grow with the layer's width.
    """
    all_units = list(range(record.num_units)) if units is None else [int(u) for u in units]
    bad = [u for u in all_units if not 0 <= u < record.num_units]
    if bad:
        raise ValueError(f"units {bad} out of range: layer {layer!r} has {record.num_units} units (0..{record.num_units - 1})")
    active = [u for u in all_units if bool(record.active[u])]
    exemplars: dict[int, list[Exemplar]] = {}
    for start in range(0, len(active), unit_chunk):  # bounded memory: maps and crops of a chunk at a time
        exemplars.update(attention_exemplars(model, layer, probe, record, active[start:start + unit_chunk],
                                             top_images, keep_images, max_crops, pooling, token_pooling, device,
                                             batch_size))
    recorded = None
    if isinstance(concept_images, ProbeRetriever) and concept_images.pool is probe:
        recorded = order_by_image(record, len(probe))  # [N, K], row i = probe image i
    it = all_units
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(all_units, desc=f"DnD {layer}", unit="unit")
    out = []
    for u in it:
        d = UnitDescription(u, [], [], [], float(record.win_rate[u]), float(record.input_rate[u]), u in exemplars)
        if not d.active:
            out.append(d)
            continue
        useed = seed * 100003 + u
        d.exemplars = ex = exemplars[u]
        for e, cap in zip(ex, captioner(ex, useed)):
            e.caption = cap
        if candidates_fn is not None:
            d.candidates = list(dict.fromkeys(candidates_fn(u, ex)))
        else:
            d.candidates = candidate_concepts([e.caption for e in ex], summarizer, rounds, useed)
        if not d.candidates:
            d.notes.append("no candidate concept (empty summaries)")
            out.append(d)
            continue
        real_acts = torch.tensor([e.activation for e in ex])
        own = sorted({e.source for e in ex})
        if recorded is not None:  # images retrieved from the recorded probe set: their activations are known
            idx = [concept_images.indices(c, num_concept_images, useed + j, own) for j, c in enumerate(d.candidates)]
            imgs = [[probe.raw(i) for i in group] for group in idx]
            acts = recorded[[i for group in idx for i in group], u]
        else:
            imgs = [concept_images(c, num_concept_images, useed + j, exclude=own) for j, c in enumerate(d.candidates)]
        flat = [im for group in imgs for im in group]
        if recorded is None:
            acts = layer_activations(model, layer, flat, probe.transform, probe.grayscale, pooling, token_pooling,
                                     device, batch_size)
            acts = acts[:, u] if flat else torch.empty(0)
        sizes = [len(g) for g in imgs]
        concept_acts = list(torch.split(acts, sizes)) if flat else [torch.empty(0) for _ in sizes]
        real_emb = concept_embs = None
        if image_embedder is not None and flat:
            real_emb = image_embedder([e.image for e in ex])
            concept_embs = list(torch.split(image_embedder(flat), sizes))
        d.selection = select_concepts(d.candidates, real_acts, concept_acts, real_emb, concept_embs, beta)
        out.append(d)
    return out


def to_layer_labels(layer: str, descriptions: Sequence[UnitDescription], record: LayerRecord) -> LayerLabels:
    """DnD results in the same table shape as the vocabulary labelings (label, score, 2nd and 3rd)."""
    rows = []
    for d in descriptions:
        sel = d.selection
        rows.append(NeuronRow(
            layer=layer, unit=d.unit, label=sel[0].concept if sel else None, score=sel[0].final if sel else None,
            next_labels=[s.concept for s in sel[1:]], next_scores=[s.final for s in sel[1:]],
            win_rate=d.win_rate, input_rate=d.input_rate, active=d.active,
            top_images=[e.source for e in d.exemplars if e.box is None]))
    summary = record.summary()
    labelled = [r for r in rows if r.label is not None]
    summary.update({"method": "describe_and_dissect", "described_units": len(rows),
                    "labelled_units": len(labelled), "unique_labels": len({r.label for r in labelled})})
    return LayerLabels(layer=layer, rows=rows, summary=summary)


def write_dnd_report(out_dir, results: dict[str, list[UnitDescription]], records: dict[str, LayerRecord],
                     meta: Optional[dict] = None, html: bool = True):
    """The usual ``<layer>.csv/.json`` and ``summary.json``, plus ``<layer>_dnd.json`` (captions, candidates,
    every selection score, exemplar boxes) and an ``index.html`` showing crops and captions per unit."""
    import json
    from pathlib import Path

    from lwta_vision.dissect.report import atomic_write_text, safe_name, write_dnd_html, write_tables

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(out_dir, {l: to_layer_labels(l, d, records[l]) for l, d in results.items()}, meta)
    for layer, descriptions in results.items():
        units = [{"unit": d.unit, "active": d.active, "label": d.label, "candidates": d.candidates,
                  "selection": [vars(s) for s in d.selection], "notes": d.notes,
                  "exemplars": [{"source": e.source, "box": list(e.box) if e.box else None,
                                 "activation": e.activation, "caption": e.caption} for e in d.exemplars]}
                 for d in descriptions]
        atomic_write_text(out_dir / f"{safe_name(layer)}_dnd.json", json.dumps({"layer": layer, "units": units}, indent=1))
    if html:
        write_dnd_html(out_dir, results)
    return out_dir
