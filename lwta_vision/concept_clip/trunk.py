"""The concept CLIP's image trunk: a small plain CNN registered with timm, so open_clip builds it from JSON.

Why not open_clip's own towers: a ModifiedResNet downsamples 4x in its stem and a ViT of this size
learns little in minutes on a CPU; at 32 px both lose the small shapes (measured: shape words stayed near
chance while colours and textures were learnt). Like the quickstart network, this trunk keeps full
resolution in its first convolution and pools globally by max ("is this pattern anywhere").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

TRUNK_NAME = "lwta_concept_cnn"


class ConceptCNN(nn.Module):
    """conv-bn-relu stages with 2x2 max-pools after the first two; the timm model interface open_clip uses
    (``num_features``, ``reset_classifier``, ``default_cfg``)."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 128), num_classes: int = 0, global_pool: str = "max",
                 in_chans: int = 3, **_: object):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            prev = w
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.default_cfg = self.pretrained_cfg = {"pool_size": None, "num_classes": num_classes}
        self.reset_classifier(num_classes, global_pool)

    def reset_classifier(self, num_classes: int, global_pool: str = "max") -> None:
        if global_pool not in ("max", "avg", ""):
            raise ValueError(f"global_pool must be 'max' or 'avg', got {global_pool!r}")
        self.global_pool = global_pool or "max"
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.amax((2, 3)) if self.global_pool == "max" else x.mean((2, 3))
        return self.fc(x)


def register_trunk() -> str:
    """Register the trunk with timm once per process; returns its timm name."""
    import timm
    from timm.models import register_model

    if not timm.is_model(TRUNK_NAME):
        def lwta_concept_cnn(pretrained: bool = False, **kwargs) -> ConceptCNN:
            if pretrained:
                raise ValueError(f"{TRUNK_NAME} has no timm pretrained weights; load the CLIP checkpoint instead")
            return ConceptCNN(**kwargs)

        lwta_concept_cnn.__module__ = __name__
        register_model(lwta_concept_cnn)
    return TRUNK_NAME
