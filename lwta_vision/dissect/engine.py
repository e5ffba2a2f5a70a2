"""Label neurons: recorded activations x image-concept matrix -> per-neuron labels (torch only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from lwta_vision.dissect.recording import LayerRecord, order_by_image
from lwta_vision.dissect.similarity import get_similarity


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
            "top_images": self.top_images,
        }


@dataclass
class LayerLabels:
    layer: str
    rows: list[NeuronRow]
    summary: dict
    scores: Optional[Tensor] = None  # [K, M] similarity of every unit (inactive rows NaN)

    @property
    def labels(self) -> list[Optional[str]]:
        return [r.label for r in self.rows]

    def top_labels(self, n: int = 5, concepts: Optional[Sequence[str]] = None) -> list[list[str]]:
        """Best ``n`` labels per unit (needs ``scores`` and the concept list)."""
        if self.scores is None or concepts is None:
            return [[l for l in [r.label] + r.next_labels if l] for r in self.rows]
        idx = torch.nan_to_num(self.scores, nan=-float("inf")).topk(min(n, len(concepts)), dim=1).indices
        return [[concepts[j] for j in row] for row in idx.tolist()]


def label_layer(
    record: LayerRecord,
    image_concept: Tensor,
    concepts: Sequence[str],
    similarity: str = "soft_wpmi",
    similarity_kwargs: Optional[dict] = None,
    report_top_images: int = 10,
) -> LayerLabels:
    """Score every active unit of a layer against every concept and keep the best three labels.

    Units that never won on the probe set (LWTA losers everywhere) are reported inactive with no label:
    a label for a unit that never fires would describe noise.
    """
    if image_concept.shape[1] != len(concepts):
        raise ValueError(f"image-concept matrix has {image_concept.shape[1]} columns for {len(concepts)} concepts")
    n = image_concept.shape[0]
    acts = order_by_image(record, n)
    active = record.active
    fn = get_similarity(similarity)
    kwargs = dict(similarity_kwargs or {})
    scores = torch.full((record.num_units, len(concepts)), float("nan"))
    if active.any():
        scores[active] = fn(acts[:, active], image_concept.float(), **kwargs).float().cpu()
    k = min(3, len(concepts))
    top_s, top_j = torch.nan_to_num(scores, nan=-float("inf")).topk(k, dim=1)
    top_img = record.top_indices[: min(report_top_images, record.top_indices.shape[0])].T
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
            )
        )
    summary = record.summary()
    labelled = [r for r in rows if r.active]
    summary.update(
        {
            "similarity": similarity,
            "unique_labels": len({r.label for r in labelled}),
            "mean_top_score": (sum(r.score for r in labelled) / len(labelled)) if labelled else float("nan"),
        }
    )
    return LayerLabels(layer=record.name, rows=rows, summary=summary, scores=scores)


def label_drift(previous: Sequence[Optional[str]], current: Sequence[Optional[str]]) -> float:
    """Fraction of units whose label changed between two dissections of the same layer."""
    if len(previous) != len(current) or not current:
        return float("nan")
    return sum(a != b for a, b in zip(previous, current)) / len(current)
