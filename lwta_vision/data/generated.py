"""The LightningDataModule over the generated shapes (the pure dataset lives in lwta_vision.datasets.shapes)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from lwta_vision.data.base import VisionDataModule
from lwta_vision.datasets.shapes import (  # noqa: F401  (re-exported: the documented import path)
    _PALETTE,
    COLOURS,
    CONCEPT_CATEGORIES,
    CONCEPT_NAMES,
    SHAPES,
    TEXTURES,
    ShapesConceptDataset,
    render_scene,
    shape_mask,
    texture_mask,
)


class ConceptDataModule(VisionDataModule):
    """DataModule over :class:`ShapesConceptDataset`: train, val and test from independent streams.

    Args:
        num_train: training images.
        num_val: validation images (also the default probe set for dissection).
        num_test: test images.
        image_size: side in pixels (e.g. 32 or 64).
        seed: determines every image of every split.
        batch_size: images per batch.
        num_workers: DataLoader workers; 0 is fastest, since images are rendered once into memory.
        augment: random horizontal flips for training (off by default: the data is already varied).
        data_dir: unused; accepted so that configs can set ``data_dir`` for every DataModule alike.
        pin_memory: pin host memory in the loaders.
        concept_masks: training batches become ``(images, labels, masks)`` with bool masks ``[B, M, H, W]``
            (``concept_names`` order), for units planted to detect a concept
            (``LitClassifier(planted=...)``); needs ``augment: false``, since a flip would move the image
            and not its masks.
    """

    name = "shapes"
    num_classes = len(SHAPES)
    class_names = list(SHAPES)
    concept_names = list(CONCEPT_NAMES)
    concept_categories = list(CONCEPT_CATEGORIES)
    in_channels = 3
    image_size = 64  # overridden per instance by the image_size argument
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, num_train: int = 8000, num_val: int = 1000, num_test: int = 1000,
                 image_size: int = 64, seed: int = 0, batch_size: int = 128, num_workers: int = 0,
                 augment: bool = False, data_dir: Optional[str] = None, pin_memory: bool = False,
                 concept_masks: bool = False):
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=None,
                         seed=seed, augment=augment, pin_memory=pin_memory)
        for arg, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value <= 0:
                raise ValueError(f"{arg} must be positive, got {value}; set data.init_args.{arg}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}; set data.init_args.image_size")
        if concept_masks and augment:
            raise ValueError("concept_masks: true needs augment: false (a flipped image would no longer match its "
                             "masks); set data.init_args.augment: false")
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.concept_masks = concept_masks
        self.image_size = image_size
        self.name = f"shapes{image_size}-seed{seed}"

    def _load_raw_splits(self) -> dict[str, Dataset]:
        sizes = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        return {split: ShapesConceptDataset(n, self.image_size, self.seed, split=split).materialize()
                for split, n in sizes.items()}

    def _augmentation(self) -> list[Callable]:
        return [T.RandomHorizontalFlip()]

    def dataset(self, split: str) -> Dataset:
        ds = super().dataset(split)
        if split == "train" and self.concept_masks:
            return _WithConceptMasks(ds, self._raw["train"][0])
        return ds


class _WithConceptMasks(Dataset):
    """``(image, label, masks)`` items: a view of the shapes data plus each image's bool concept masks."""

    def __init__(self, view: Dataset, shapes: ShapesConceptDataset):
        self.view, self.shapes = view, shapes

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, i: int):
        x, y = self.view[i]
        return x, y, torch.from_numpy(self.shapes.concept_masks(i))
