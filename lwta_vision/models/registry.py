"""One registry for every backbone: ``create_model(name, **kwargs)`` and ``list_models()``."""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone, e.g. ``create_model("resnet18", stem="cifar", act="lwta",
    act_kwargs={"competitors": 2}, num_classes=10)``."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; available: {', '.join(list_models())}")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"model {name!r}: {err} (check model_kwargs in the config)") from None


def backbone_kwargs(model_kwargs: dict | None = None, act: str | None = None,
                    act_kwargs: dict | None = None) -> dict:
    """``model_kwargs`` with the activation merged in. The activation is its own argument so that a config overlay
    (``configs/act/*.yaml``) can swap it: stacked configs replace a whole dict, so an overlay setting
    ``model_kwargs.act`` would drop the recipe's other backbone arguments."""
    kwargs = dict(model_kwargs or {})
    for key, value in (("act", act), ("act_kwargs", act_kwargs)):
        if value is None:
            continue
        if kwargs.get(key) is not None and kwargs[key] != value:
            raise ValueError(f"{key} is set twice, as model.init_args.{key}={value!r} and in model_kwargs "
                             f"({kwargs[key]!r}); set it once, as model.init_args.{key}")
        kwargs[key] = value
    return kwargs
