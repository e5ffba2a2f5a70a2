"""Neuron dissection, torch only: record activations, score concepts, label units, write reports.

Shared machinery lives here (``recording``, ``cache``, ``concepts``, ``labels``, ``report``, ``pipeline``);
each method has its own subpackage: ``clip_dissect``, ``netdissect``, ``dnd``; ``evaluate`` measures labels.
"""
from lwta_vision.datasets.broden import BrodenDataset
from lwta_vision.datasets.probe import ImageFolderImages, ProbeSet
from lwta_vision.dissect.clip_dissect import (
                                              SIMILARITIES,
                                              CLIPScorer,
                                              GroundTruthScorer,
                                              Scorer,
                                              WeightsUnavailableError,
                                              get_similarity,
                                              label_layer,
                                              soft_wpmi,
)
from lwta_vision.dissect.clip_dissect.labeling import label_records
from lwta_vision.dissect.concepts import BUILTIN_CONCEPT_SETS, load_concept_set
from lwta_vision.dissect.labels import TIE_TOL, LayerLabels, label_drift, rank_concepts
from lwta_vision.dissect.netdissect import GeneratedMasks, iou_dissect, label_agreement, streaming_thresholds
from lwta_vision.dissect.pipeline import record_probe, write_report
from lwta_vision.dissect.recording import LayerRecord, record_activations, resolve_layers, spatial_maps

__all__ = [
    "BUILTIN_CONCEPT_SETS", "BrodenDataset", "GeneratedMasks", "iou_dissect", "label_agreement",
    "streaming_thresholds", "CLIPScorer", "GroundTruthScorer", "ImageFolderImages", "LayerLabels", "LayerRecord",
    "ProbeSet", "SIMILARITIES", "Scorer", "WeightsUnavailableError", "get_similarity", "label_drift", "label_layer",
    "label_records", "load_concept_set", "record_activations", "record_probe", "resolve_layers", "soft_wpmi",
    "spatial_maps", "write_report", "TIE_TOL", "rank_concepts",
]
