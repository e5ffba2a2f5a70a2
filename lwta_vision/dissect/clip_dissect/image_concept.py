"""The image-concept matrix P without building it: rows and columns of CLIP similarities on demand.

P[x, t] is the cosine similarity of image x's and concept t's CLIP embeddings, i.e. ``image @ text.T`` of
the L2-normalised embeddings. At ImageNet scale (50,000 images, 20,000 words) P is 4 GB in float32 before
anything is computed, while soft-WPMI needs only the rows of each neuron's top images and label quality
only the columns of the chosen labels. :class:`EmbeddingProduct` holds the [N, d] and [M, d] embeddings
(d = 512: 1/40 of P at 20k words) and computes what is asked for. Dense scorers (ground truth) keep
passing a plain tensor; the functions below accept either.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


class EmbeddingProduct:
    """P = ``image @ text.T`` as a lazy [N, M] matrix: ``rows``, ``columns`` and ``dense`` compute it.

    Args:
        image: [N, d] image embeddings (L2-normalised for CLIP's cosine).
        text: [M, d] text embeddings, same d, device and dtype.
    """

    def __init__(self, image: Tensor, text: Tensor):
        if image.ndim != 2 or text.ndim != 2 or image.shape[1] != text.shape[1]:
            raise ValueError(f"image embeddings {tuple(image.shape)} and text embeddings {tuple(text.shape)} must "
                             "be [N, d] and [M, d] with the same d")
        if image.device != text.device or image.dtype != text.dtype:
            raise ValueError(f"image and text embeddings must share a device and dtype, got {image.device}/"
                             f"{image.dtype} and {text.device}/{text.dtype}")
        self.image, self.text = image, text

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.image.shape[0], self.text.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.image.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image.dtype

    def rows(self, index: Tensor) -> Tensor:
        """P[index] [len(index), M], a new tensor."""
        return self.image.index_select(0, index.to(self.device)) @ self.text.T

    def columns(self, index: Tensor) -> Tensor:
        """P[:, index] [N, len(index)], a new tensor."""
        return self.image @ self.text.index_select(0, index.to(self.device)).T

    def dense(self) -> Tensor:
        """The whole [N, M] matrix: for the similarities that need every entry (the cosine family)."""
        return self.image @ self.text.T

    def to(self, device=None, dtype=None) -> "EmbeddingProduct":
        return EmbeddingProduct(self.image.to(device=device, dtype=dtype), self.text.to(device=device, dtype=dtype))

    def float(self) -> "EmbeddingProduct":
        return self.to(dtype=torch.float32)

    def cpu(self) -> "EmbeddingProduct":
        return self.to(device="cpu")

    def __repr__(self) -> str:
        return f"EmbeddingProduct(images={self.shape[0]}, concepts={self.shape[1]}, dim={self.image.shape[1]})"


ImageConcept = Union[Tensor, EmbeddingProduct]
"""What a scorer gives labeling: a dense [N, M] tensor, or an :class:`EmbeddingProduct`."""


def rows_of(p: ImageConcept, index: Tensor) -> Tensor:
    """P[index] for a dense or lazy matrix (a copy either way)."""
    return p.rows(index) if isinstance(p, EmbeddingProduct) else p.index_select(0, index.to(p.device))


def columns_of(p: ImageConcept, index: Tensor) -> Tensor:
    """P[:, index] for a dense or lazy matrix."""
    return p.columns(index) if isinstance(p, EmbeddingProduct) else p.index_select(1, index.to(p.device))


def as_dense(p: ImageConcept) -> Tensor:
    """The full matrix (built, for a lazy one)."""
    return p.dense() if isinstance(p, EmbeddingProduct) else p


def images_of(p: ImageConcept, index: Tensor) -> ImageConcept:
    """P restricted to the images ``index`` (rows), lazy where P is: a held-out part of the probe."""
    if isinstance(p, EmbeddingProduct):
        return EmbeddingProduct(p.image.index_select(0, index.to(p.device)), p.text)
    return p.index_select(0, index.to(p.device))
