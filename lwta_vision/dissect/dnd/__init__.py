"""Describe-and-Dissect (Bai et al., 2024): exemplar crops, captions summarised into candidate concepts, and
the candidate whose images the unit ranks highest (:mod:`.selection`); the generative models it takes, loaded
lazily (:mod:`.generative`)."""
from lwta_vision.dissect.dnd.selection import (
                                               Captioner,
                                               ConceptImages,
                                               Exemplar,
                                               ProbeRetriever,
                                               Selection,
                                               Summarizer,
                                               UnitDescription,
                                               attention_exemplars,
                                               candidate_concepts,
                                               clean_concept,
                                               describe_layer,
                                               select_concepts,
                                               to_layer_labels,
                                               write_dnd_report,
)

__all__ = ["Captioner", "ConceptImages", "Exemplar", "ProbeRetriever", "Selection", "Summarizer", "UnitDescription",
           "attention_exemplars", "candidate_concepts", "clean_concept", "describe_layer", "select_concepts",
           "to_layer_labels", "write_dnd_report"]
