"""Pure torch datasets (no Lightning): generated concept shapes with masks, Broden, idx files, in-memory
arrays and probe sets. The LightningDataModules in :mod:`lwta_vision.data` wrap them."""
from lwta_vision.datasets.arrays import ArrayImageDataset, TransformedView
from lwta_vision.datasets.broden import BrodenDataset
from lwta_vision.datasets.idx import read_idx
from lwta_vision.datasets.probe import ImageFolderImages, ProbeSet
from lwta_vision.datasets.shapes import (
           COLOURS,
           CONCEPT_CATEGORIES,
           CONCEPT_NAMES,
           SHAPES,
           TEXTURES,
           ShapesConceptDataset,
)

__all__ = ["ArrayImageDataset", "BrodenDataset", "CONCEPT_CATEGORIES", "CONCEPT_NAMES", "COLOURS", "ImageFolderImages",
           "ProbeSet", "SHAPES", "TEXTURES", "ShapesConceptDataset", "TransformedView", "read_idx"]
