"""``dissect.py explain``: one prediction explained with the labels of the units that won."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torchvision import transforms as T

from lwta_vision.checkpoints import load_network
from lwta_vision.data.base import VisionDataModule
from lwta_vision.dissect.recording import capture, eval_mode
from lwta_vision.dissect_cli.loading import (
    check_layers,
    instantiate,
    last_linear,
    load_torchvision_model,
    run_config,
    torch_device,
    weights_record,
)


def explain(
    image: str,
    labels_dir: str = "outputs/dissect",
    checkpoint: Optional[str] = None,
    torchvision_model: Optional[str] = None,
    torchvision_weights: Optional[str] = "DEFAULT",
    data: Optional[VisionDataModule] = None,
    top_units: int = 5,
    device: str = "auto",
) -> dict:
    """Explain one prediction in words, using the labels a previous ``describe`` wrote to ``labels_dir``.

    For every dissected layer: the units most active on this image (for LWTA layers, the winners) and
    their labels. For the final Linear layer: the input units with the largest contribution
    (weight x activation) to the predicted logit, labelled when the layer feeding it was dissected.

    Args:
        torchvision_weights: DEFAULT, IMAGENET1K_V1, ... (the model's weights enum), or ``random`` for a
            deliberate untrained baseline (announced on stderr, recorded as ``weights``); null is refused.
    """
    from PIL import Image

    dev = torch_device(device)
    summary_path = Path(labels_dir) / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found; run `dissect.py describe --output_dir {labels_dir}` first")
    layer_names = list(json.loads(summary_path.read_text())["layers"])
    from lwta_vision.dissect.report import safe_name

    labels = {l: json.loads((Path(labels_dir) / f"{safe_name(l)}.json").read_text())["units"] for l in layer_names}
    if not Path(image).is_file():
        raise FileNotFoundError(f"image {image!r} does not exist")
    if checkpoint is not None:
        net, hp = load_network(checkpoint)
        class_names = hp.get("class_names") or [str(i) for i in range(hp.get("num_classes", 0))]
        dm = data or (instantiate(c["data"]) if (c := run_config(checkpoint)) and c.get("data") else None)
        if dm is None:
            raise ValueError("pass --data (the training datamodule) for the network's preprocessing")
        transform = T.Compose([T.Resize((dm.image_size, dm.image_size)), dm.eval_transform])
        gray = dm.in_channels == 1
    else:
        net, transform, class_names = load_torchvision_model(torchvision_model, torchvision_weights)
        gray = False
    net = net.to(dev)
    check_layers(net, layer_names)
    try:
        img = Image.open(image).convert("L" if gray else "RGB")
    except OSError as err:
        raise ValueError(f"cannot read image {image!r}: {err}") from None
    x = transform(img)[None].to(dev)
    head = last_linear(net)
    head_mod = net.get_submodule(head)
    feats = {}
    h = head_mod.register_forward_hook(lambda m, i, o: feats.__setitem__("in", i[0].detach()))
    try:
        with torch.no_grad(), eval_mode(net), capture(net, layer_names) as outs:
            logits = net(x)
            outs = dict(outs)
    finally:
        h.remove()
    probs = logits.softmax(-1)[0]
    pred = int(probs.argmax())
    result = {"image": image, "prediction": class_names[pred] if pred < len(class_names) else pred,
              "probability": float(probs[pred]), "layers": {}, "contributions": [],
              "weights": weights_record(checkpoint, torchvision_model, torchvision_weights)}
    from lwta_vision.dissect.recording import pool_output

    print(f"{image}: predicted {result['prediction']!r} (p={result['probability']:.3f})")
    for layer in layer_names:
        pooled = pool_output(outs[layer])[0].float().cpu()
        if len(labels[layer]) != pooled.numel():
            raise ValueError(f"{labels_dir} labels {len(labels[layer])} units of {layer!r} but this network's "
                             f"{layer!r} has {pooled.numel()}: the labels describe another network; run "
                             f"`dissect.py describe` on this one with another --output_dir and pass that")
        order = pooled.argsort(descending=True)[:top_units].tolist()
        rows = [{"unit": u, "activation": float(pooled[u]), "label": labels[layer][u]["label"]} for u in order
                if pooled[u] != 0]
        result["layers"][layer] = rows
        print(f"  {layer}: " + ", ".join(f"unit {r['unit']} ({r['label']}, {r['activation']:.2f})" for r in rows))
    feat = feats["in"][0].float().cpu()
    contrib = head_mod.weight[pred].detach().float().cpu() * feat
    feeding = next((l for l in reversed(layer_names) if l != head and len(labels[l]) == feat.numel()), None)
    for u in contrib.argsort(descending=True)[:top_units].tolist():
        lab = labels[feeding][u]["label"] if feeding else None
        result["contributions"].append({"unit": u, "contribution": float(contrib[u]), "label": lab, "layer": feeding})
    print(f"  why {result['prediction']!r}: " + ", ".join(
        f"{c['label'] or 'unit ' + str(c['unit'])} (+{c['contribution']:.2f})" for c in result["contributions"]))
    return result
