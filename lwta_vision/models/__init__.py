"""Backbones, all behind one registry; each takes ``act`` ("relu", "gelu", "lwta") and ``act_kwargs``."""
from lwta_vision.models import convnet, resnet, vit  # noqa: F401  (register the models)
from lwta_vision.models.registry import backbone_kwargs, create_model, list_models, register_model

__all__ = ["backbone_kwargs", "create_model", "list_models", "register_model"]
