"""In-memory image datasets and views: raw ``(PIL image, label)`` items, transforms kept apart."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class ArrayImageDataset(Dataset):
    """``(PIL image, label)`` items from a uint8 array of shape ``[N, H, W]`` or ``[N, H, W, C]``.

    Decoded-in-memory datasets (Fashion-MNIST, CIFAR) are small enough to hold as one array, and PIL is
    the common currency of torchvision transforms and of :class:`ProbeSet`.
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C]; got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i]), int(self.labels[i])


class TransformedView(Dataset):
    """A view of a raw ``(image, label)`` dataset: optional subset of indices, optional image transform.

    Train and val views share one underlying dataset but never a transform, so validation images are
    never augmented.
    """

    def __init__(self, dataset: Dataset, indices: Optional[Sequence[int]] = None,
                 transform: Optional[Callable] = None):
        self.dataset, self.transform = dataset, transform
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        if self.indices is not None:
            i = self.indices[i]
        image, label = self.dataset[i]
        return (image if self.transform is None else self.transform(image)), label
