"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023): label units by how their top images agree with a CLIP
image-text similarity over a concept vocabulary (soft-WPMI and the other similarities)."""
from lwta_vision.dissect.clip_dissect.clip import CLIPScorer
from lwta_vision.dissect.clip_dissect.encoding import CLIPEncoder
from lwta_vision.dissect.clip_dissect.image_concept import EmbeddingProduct
from lwta_vision.dissect.clip_dissect.labeling import label_layer, label_records
from lwta_vision.dissect.clip_dissect.scorers import (
                                                      GroundTruthScorer,
                                                      Scorer,
                                                      UnknownConceptError,
                                                      WeightsUnavailableError,
                                                      resolve_device,
)
from lwta_vision.dissect.clip_dissect.similarity import (
                                                      SIMILARITIES,
                                                      cos_similarity,
                                                      cos_similarity_cubed,
                                                      get_similarity,
                                                      rank_reorder,
                                                      soft_wpmi,
                                                      soft_wpmi_reference,
                                                      wpmi,
)
from lwta_vision.dissect.clip_dissect.weights import LoadedCLIP, load_clip

__all__ = ["CLIPEncoder", "CLIPScorer", "EmbeddingProduct", "cos_similarity", "cos_similarity_cubed", "get_similarity",
           "GroundTruthScorer", "label_layer", "label_records", "load_clip", "LoadedCLIP", "rank_reorder",
           "resolve_device", "Scorer", "SIMILARITIES", "soft_wpmi", "soft_wpmi_reference", "UnknownConceptError",
           "WeightsUnavailableError", "wpmi"]
