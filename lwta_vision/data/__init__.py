"""LightningDataModules for the image datasets, and the generated concept dataset used to test dissection."""
from lwta_vision.data.base import ArrayImageDataset, TransformedView, VisionDataModule
from lwta_vision.data.generated import (
    CONCEPT_CATEGORIES,
    CONCEPT_NAMES,
    ConceptDataModule,
    ShapesConceptDataset,
)

__all__ = [
    "ArrayImageDataset",
    "CONCEPT_CATEGORIES",
    "CONCEPT_NAMES",
    "ConceptDataModule",
    "ShapesConceptDataset",
    "TransformedView",
    "VisionDataModule",
]
