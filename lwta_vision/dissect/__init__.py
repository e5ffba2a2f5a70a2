"""Neuron dissection, torch only: record activations, score concepts, label units, write reports."""
from lwta_vision.dissect.concepts import BUILTIN_CONCEPT_SETS, load_concept_set
from lwta_vision.dissect.broden import BrodenDataset
from lwta_vision.dissect.engine import TIE_TOL, LayerLabels, label_drift, label_layer, rank_concepts
from lwta_vision.dissect.iou import GeneratedMasks, iou_dissect, label_agreement, streaming_thresholds
from lwta_vision.dissect.pipeline import label_records, record_probe, write_report
from lwta_vision.dissect.probe import ImageFolderImages, ProbeSet
from lwta_vision.dissect.recording import LayerRecord, record_activations, resolve_layers, spatial_maps
from lwta_vision.dissect.scorers import CLIPScorer, GroundTruthScorer, Scorer, WeightsUnavailableError
from lwta_vision.dissect.similarity import SIMILARITIES, get_similarity, soft_wpmi

__all__ = [
    "BUILTIN_CONCEPT_SETS", "BrodenDataset", "GeneratedMasks", "iou_dissect", "label_agreement",
    "streaming_thresholds", "CLIPScorer", "GroundTruthScorer", "ImageFolderImages", "LayerLabels", "LayerRecord",
    "ProbeSet", "SIMILARITIES", "Scorer", "WeightsUnavailableError", "get_similarity", "label_drift", "label_layer",
    "label_records", "load_concept_set", "record_activations", "record_probe", "resolve_layers", "soft_wpmi",
    "spatial_maps", "write_report", "TIE_TOL", "rank_concepts",
]
