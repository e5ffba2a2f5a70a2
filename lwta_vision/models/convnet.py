"""A small CNN for the CPU quickstart and the dissection experiments on generated data."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lwta_vision.layers import create_act
from lwta_vision.models.registry import register_model


class ConvNet(nn.Module):
    """conv-bn-act stages (``layer1``..``layerN``, each ``conv``, ``bn``, ``act``, then 2x2 max-pool except the
    last), global average (or max) pool, ``fc``. Small enough to train in minutes on two CPU cores."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        act: str = "relu",
        act_kwargs: Optional[dict] = None,
        global_pool: str = "avg",
    ):
        super().__init__()
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
        act_kwargs = dict(act_kwargs or {})
        prev = in_channels
        self.num_layers = len(widths)
        for i, w in enumerate(widths):
            stage = nn.Sequential()
            stage.add_module("conv", nn.Conv2d(prev, w, 3, 1, 1, bias=False))
            stage.add_module("bn", nn.BatchNorm2d(w))
            stage.add_module("act", create_act(act, dim=1, width=w, **act_kwargs))
            if i < len(widths) - 1:
                stage.add_module("pool", nn.MaxPool2d(2))
            setattr(self, f"layer{i + 1}", stage)
            prev = w
        # max: "is this pattern anywhere", which suits detection-style tasks such as the generated shapes
        self.pool = nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model
def convnet_small(**kwargs) -> ConvNet:
    """Three conv stages (32, 64, 128 channels): the quickstart network."""
    return ConvNet(**kwargs)
