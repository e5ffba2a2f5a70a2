"""Concept scorers: the matrix P [N probe images, M concepts] that CLIP-Dissect compares activations with.

- :class:`Scorer`: the interface; :class:`CLIPScorer` (:mod:`.clip`) is the CLIP one.
- :class:`GroundTruthScorer`: the dataset's own binary concept annotations, for datasets that have them.
"""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from lwta_vision.datasets.probe import ProbeSet, _FirstN
from lwta_vision.dissect.clip_dissect.image_concept import ImageConcept
from lwta_vision.dissect.errors import WeightsUnavailableError  # noqa: F401  (part of the scorer API)

__all__ = ["Scorer", "GroundTruthScorer", "UnknownConceptError", "WeightsUnavailableError", "resolve_device"]


class Scorer(ABC):
    """Produces P [N images, M concepts]: how much each probe image shows each concept."""

    @abstractmethod
    def similarity(self, probe: ProbeSet, concepts: Sequence[str]) -> Tensor:
        """P as a float32 CPU tensor of shape [len(probe), len(concepts)]."""

    def image_concept(self, probe: ProbeSet, concepts: Sequence[str]) -> ImageConcept:
        """P for labeling: dense here; scorers with embeddings return them unmultiplied
        (:class:`~lwta_vision.dissect.clip_dissect.image_concept.EmbeddingProduct`), so P is never built."""
        return self.similarity(probe, concepts)


class UnknownConceptError(KeyError, ValueError):
    """Concepts that a :class:`GroundTruthScorer`'s dataset does not annotate: a wrong input (ValueError, what
    the CLIs show as one line), still a KeyError for callers that caught one before."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


class GroundTruthScorer(Scorer):
    """P from a dataset's own concept annotations: ``scale`` where the concept is present, 0 elsewhere.

    Why the scale: soft-WPMI's defaults (a=10) are calibrated for CLIP cosine similarities, whose gaps
    between a present and an absent concept are ~0.1-0.3; ``scale=0.3`` puts ground truth on that scale
    (a * P gap = 3), ``scale=1`` gives the raw 0/1 matrix. Either way soft-WPMI saturates (every concept a
    unit dominates scores log K) and the labeling decides such ties by a second key
    (:mod:`lwta_vision.dissect.clip_dissect.labeling`); measured on the quickstart's fc over seeds 0-2 (RESULTS.md §0),
    both scales then name the same 17/18 classes, and 0.3 leaves slightly fewer labels to the tie-break.

    The rows belong to one dataset, by identity: :meth:`similarity` refuses a probe set built on another one,
    even of the same length (the val and test splits of the generated data both have 1000 images, and
    annotations of the one would silently label the other). A view of the annotated dataset
    (``probe.first(n)``) gets its own rows.

    Args:
        presence: [N images, M concepts] tensor, nonzero where the concept is present.
        concept_names: the M column names.
        dataset: optional; the dataset the rows belong to, checked against the probe set's dataset (without
            it any probe set of N images is accepted).
        scale: the value of a present concept.
    """

    def __init__(self, presence: Tensor, concept_names: Sequence[str], dataset: Optional[object] = None,
                 scale: float = 0.3):
        if scale <= 0:
            raise ValueError(f"GroundTruthScorer scale must be > 0, got {scale}")
        self.scale = float(scale)
        presence = torch.as_tensor(presence)
        if presence.ndim != 2 or presence.shape[1] != len(concept_names):
            raise ValueError(f"presence must be [N images, {len(concept_names)} concepts]; got {tuple(presence.shape)}")
        self.presence = presence.float()
        self.concept_names = [str(c) for c in concept_names]
        self.dataset = dataset
        self._index: Dict[str, int] = {}
        for j, name in enumerate(self.concept_names):
            norm = _norm(name)
            if norm in self._index:
                raise ValueError(f"duplicate concept name {name!r} (column {self._index[norm]} and {j})")
            self._index[norm] = j

    @classmethod
    def from_dataset(cls, dataset: object, scale: float = 0.3) -> "GroundTruthScorer":
        """From a dataset with ``presence_matrix() -> Tensor[N, M]`` and ``concept_names`` (e.g. the shapes data)."""
        if not hasattr(dataset, "presence_matrix") or not hasattr(dataset, "concept_names"):
            raise TypeError(f"{type(dataset).__name__} has no concept annotations: GroundTruthScorer.from_dataset "
                            "needs presence_matrix() and concept_names (e.g. ShapesConceptDataset)")
        return cls(dataset.presence_matrix(), list(dataset.concept_names), dataset=dataset, scale=scale)

    def similarity(self, probe: ProbeSet, concepts: Sequence[str]) -> Tensor:
        """``scale`` x the presence rows of the probe's images, with columns in the order of ``concepts``."""
        presence = self._rows(probe)
        unknown = [c for c in concepts if _norm(c) not in self._index]
        if unknown:
            hints = [f"{c!r} (close: {difflib.get_close_matches(c, self.concept_names, n=3)})" for c in unknown[:5]]
            raise UnknownConceptError(f"{len(unknown)} concepts are not annotated in the dataset: {', '.join(hints)}; "
                                      f"annotated: {', '.join(self.concept_names[:30])}"
                                      f"{' ...' if len(self.concept_names) > 30 else ''}")
        cols = torch.tensor([self._index[_norm(c)] for c in concepts], dtype=torch.long)
        return (presence != 0).float().index_select(1, cols) * self.scale

    def _rows(self, probe: ProbeSet) -> Tensor:
        """The presence rows of ``probe``'s images: all of them for the annotated dataset, the first n for a
        ``first(n)`` view of it; any other dataset is refused, whatever its length."""
        n = self.presence.shape[0]
        if self.dataset is not None:
            base, _ = _prefix_of(self.dataset)
            probe_base, k = _prefix_of(probe.dataset)
            if probe_base is not base:
                raise ValueError(
                    f"probe set {probe.name!r} ({_describe_dataset(probe_base, len(probe))}) is not built on the "
                    f"annotated dataset ({_describe_dataset(base, n)}); ground-truth P needs the probe set to be "
                    "built on the same dataset: GroundTruthScorer.from_dataset(probe.dataset)")
            if k <= n:
                return self.presence[:k]
        if len(probe) != n:
            raise ValueError(f"probe set {probe.name!r} has {len(probe)} images but the annotations cover {n}")
        return self.presence


def _prefix_of(dataset) -> tuple[object, int]:
    """``(the dataset under any ProbeSet.first(n) views, how many of its first items the view holds)``."""
    n = len(dataset)
    while isinstance(dataset, _FirstN):
        dataset = dataset.dataset
        n = min(n, len(dataset))
    return dataset, n


def _describe_dataset(dataset, n: int) -> str:
    split = getattr(dataset, "split", None)
    return f"{n} images of {type(dataset).__name__}" + (f", split {split!r}" if isinstance(split, str) else "")


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())
