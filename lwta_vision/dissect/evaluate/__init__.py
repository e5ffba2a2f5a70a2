"""How good is a label: its quality against the unit's activations (:mod:`.quality`), recovery of planted
units whose concept is known (:mod:`.planted`), and final-layer labels against class names
(:mod:`.final_layer`)."""
from lwta_vision.dissect.evaluate.final_layer import (
    SentenceEmbedder,
    TextEmbedder,
    default_sentence_model_path,
    evaluate_labels,
    label_accuracy,
    mean_cosine,
)
from lwta_vision.dissect.evaluate.planted import PlantedUnit, assign_units, planted_loss, recovered
from lwta_vision.dissect.evaluate.quality import label_quality, otsu_threshold, presence_of

__all__ = ["PlantedUnit", "SentenceEmbedder", "TextEmbedder", "assign_units", "default_sentence_model_path",
           "evaluate_labels", "label_accuracy", "label_quality", "mean_cosine", "otsu_threshold", "planted_loss",
           "presence_of", "recovered"]
