import pytest
import torch

from lwta_vision.layers import lwta_modules
from lwta_vision.models import create_model, list_models


def _tiny_kwargs(name):
    if name.startswith("vit"):
        return {"image_size": 32, "patch_size": 8, "depth": 2}
    if name.startswith("resnet"):
        return {"stem": "cifar"}
    return {}


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("act", ["relu", "lwta"])
def test_every_model_forward_backward(name, act):
    act_kwargs = {"competitors": 2, "temperature": 1.67} if act == "lwta" else None
    if name.startswith("vit") and act == "relu":
        act = "gelu"
    model = create_model(name, num_classes=7, act=act, act_kwargs=act_kwargs, **_tiny_kwargs(name))
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 7)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert bool(lwta_modules(model)) == (act == "lwta")


def test_lwta_dims_follow_layer_type():
    cnn = create_model("resnet18", stem="cifar", act="lwta", act_kwargs={"competitors": 4})
    assert {m.dim for m in lwta_modules(cnn).values()} == {1}
    vit = create_model("vit_tiny", image_size=32, patch_size=16, depth=1, act="lwta", act_kwargs={"competitors": 24})
    mods = lwta_modules(vit)
    assert list(mods) == ["blocks.0.mlp.act"] and mods["blocks.0.mlp.act"].dim == -1


def test_imagenet_stem_and_channels():
    m = create_model("resnet18", stem="imagenet", in_channels=1, num_classes=3)
    assert m(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", stem="tiny")


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match=r"did you mean resnet18"):
        create_model("resnet-18")
    with pytest.raises(TypeError, match="model_kwargs"):
        create_model("convnet_small", nonsense=1)
    with pytest.raises(ValueError, match=r"width 64 .*competitors=24"):
        create_model("resnet18", stem="cifar", act="lwta", act_kwargs={"competitors": 24})
