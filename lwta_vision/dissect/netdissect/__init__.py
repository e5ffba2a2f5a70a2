"""Network Dissection (Bau et al., CVPR 2017): IoU of each unit's thresholded activation maps with concept
masks, thresholds from a streaming top quantile."""
from lwta_vision.dissect.netdissect.iou import (
                                                GeneratedMasks,
                                                MaskSource,
                                                TopQuantile,
                                                iou_dissect,
                                                iou_matrix,
                                                label_agreement,
                                                mask_source_for,
                                                streaming_thresholds,
                                                top_rank,
)

__all__ = ["GeneratedMasks", "MaskSource", "TopQuantile", "iou_dissect", "iou_matrix", "label_agreement",
           "mask_source_for", "streaming_thresholds", "top_rank"]
