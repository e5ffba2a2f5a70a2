"""Describe-and-Dissect (Bai et al., 2024): exemplar crops, captions summarised into candidate concepts, and
the candidate whose images the unit ranks highest (:mod:`.selection`); the generative models it takes, loaded
lazily (:mod:`.generative`)."""
from lwta_vision.dissect.dnd.selection import (
    Box,
    Captioner,
    ConceptImages,
    Exemplar,
    ProbeRetriever,
    Selection,
    Summarizer,
    UnitDescription,
    attention_boxes,
    attention_exemplars,
    box_iou,
    candidate_concepts,
    clean_concept,
    connected_components,
    describe_layer,
    layer_activations,
    otsu_threshold,
    rank_scores,
    select_concepts,
    to_layer_labels,
    write_dnd_report,
)

__all__ = ["Box", "Captioner", "ConceptImages", "Exemplar", "ProbeRetriever", "Selection", "Summarizer",
           "UnitDescription", "attention_boxes", "attention_exemplars", "box_iou", "candidate_concepts",
           "clean_concept", "connected_components", "describe_layer", "layer_activations", "otsu_threshold",
           "rank_scores", "select_concepts", "to_layer_labels", "write_dnd_report"]
