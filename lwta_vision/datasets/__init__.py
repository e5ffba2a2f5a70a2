"""Pure torch datasets (no Lightning): the generated concept shapes."""
from lwta_vision.datasets.shapes import CONCEPT_CATEGORIES, CONCEPT_NAMES, COLOURS, SHAPES, TEXTURES, ShapesConceptDataset

__all__ = ["CONCEPT_CATEGORIES", "CONCEPT_NAMES", "COLOURS", "SHAPES", "TEXTURES", "ShapesConceptDataset"]
