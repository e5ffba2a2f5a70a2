"""LightningDataModules for the image datasets, and the generated concept dataset used to test dissection.

Every DataModule keeps its splits raw (PIL images) and exposes ``probe_set(split)`` for dissection; see
:class:`VisionDataModule`.
"""
from lwta_vision.data.base import ArrayImageDataset, TransformedView, VisionDataModule
from lwta_vision.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lwta_vision.data.fashion_mnist import FashionMNISTDataModule, read_idx
from lwta_vision.data.generated import (
    CONCEPT_CATEGORIES,
    CONCEPT_NAMES,
    ConceptDataModule,
    ShapesConceptDataset,
)
from lwta_vision.data.imagenet import ImageNetDataModule
from lwta_vision.data.streaming import StreamingImageDataModule

__all__ = [
    "ArrayImageDataset",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CONCEPT_CATEGORIES",
    "CONCEPT_NAMES",
    "ConceptDataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "ShapesConceptDataset",
    "StreamingImageDataModule",
    "TransformedView",
    "VisionDataModule",
    "read_idx",
]
