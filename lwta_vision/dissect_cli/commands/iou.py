"""``dissect.py iou``: Network Dissection labels by IoU with concept masks."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from lwta_vision.data.base import VisionDataModule
from lwta_vision.dissect.clip_dissect.labeling import label_records
from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer
from lwta_vision.dissect.pipeline import record_probe
from lwta_vision.dissect_cli.loading import (
    check_layers,
    check_options,
    load_inputs,
    require_layers,
    torch_device,
    weights_record,
)


def iou(
    layers: Optional[list[str]] = None,
    checkpoint: Optional[str] = None,
    torchvision_model: Optional[str] = None,
    torchvision_weights: Optional[str] = "DEFAULT",
    data: Optional[VisionDataModule] = None,
    split: str = "val",
    broden: Optional[str] = None,
    broden_categories: Optional[list[str]] = None,
    max_images: Optional[int] = None,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    compare_text: bool = True,
    output_dir: str = "outputs/iou",
    images_per_unit: int = 5,
    html: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
) -> dict:
    """Network Dissection: label conv units by IoU of their top-quantile maps with concept masks.

    The probe set must carry masks: the generated shapes data (the run's datamodule) or a Broden folder
    (``--broden /data/broden1_224``). With ``compare_text`` (default) the same units are also labelled by
    soft-WPMI with the ground-truth scorer, shown side by side, and their agreement among detectors is
    reported.

    Args:
        layers: conv layers (spatial outputs), e.g. ``[layer2, layer3]``.
        torchvision_weights: DEFAULT, IMAGENET1K_V1, ... (the model's weights enum), or ``random`` for a
            deliberate untrained baseline (announced on stderr, recorded as ``weights``); null is refused.
        broden: a Broden folder (index.csv, label.csv, images/) used as the probe set.
        broden_categories: restrict Broden to these categories (color, object, part, material, scene, texture).
        quantile: top quantile of each unit's activations that defines its map (0.005 in NetDissect).
        iou_threshold: a unit is a detector above this IoU (0.04 in NetDissect).
    """
    from lwta_vision.dissect.netdissect.iou import iou_dissect, label_agreement
    from lwta_vision.dissect.recording import spatial_maps
    from lwta_vision.dissect.report import write_html, write_tables

    dev = torch_device(device)
    require_layers(layers)
    check_options(output_dir=output_dir)
    images = name = None
    if broden:
        from lwta_vision.datasets.broden import BrodenDataset

        images = BrodenDataset(broden, categories=broden_categories, max_images=max_images)
        name = f"broden:{os.path.abspath(broden)}"
    net, probe, _ = load_inputs(checkpoint, torchvision_model, torchvision_weights, data, split, max_images, images,
                                name)
    net = net.to(dev)
    check_layers(net, layers)
    results, agreement, extra = {}, {}, {}
    text = {}
    if compare_text and hasattr(probe.dataset, "presence_matrix"):
        gt = GroundTruthScorer.from_dataset(probe.dataset)
        concepts = list(gt.concept_names)
        records = record_probe(net, layers, probe, 100, batch_size=batch_size, device=dev, progress=True)
        text = label_records(records, gt.similarity(probe, concepts), concepts)
    for layer in layers:
        labels, _ = iou_dissect(net, layer, probe, quantile=quantile, iou_threshold=iou_threshold,
                                batch_size=batch_size, device=dev, progress=True, num_workers=num_workers)
        results[layer] = labels
        if layer in text:
            agreement[layer] = label_agreement(text[layer], labels)
            labels.summary["text_agreement"] = agreement[layer]["agreement"]
            extra[layer] = {r.unit: f"text label: {r.label}" for r in text[layer].rows}
        s = labels.summary
        agree = agreement.get(layer, {}).get("agreement")
        print(f"{layer}: {s['detectors']}/{s['units']} detectors, {s['unique_concepts']} unique concepts, "
              f"mean IoU {'-' if s['mean_iou'] is None else format(s['mean_iou'], '.3f')}, "
              f"per category {s['per_category']}" + (f", text/IoU agreement {agree:.2f}" if agree is not None else ""))
        if s["detectors"] == 0:
            print(f"warning: no unit of {layer} reaches IoU {iou_threshold} (best {s['best_iou']:.3f}) at --quantile "
                  f"{quantile}: a unit's map then covers {quantile:.1%} of its activations, which on small maps is far "
                  f"less than a concept's area and caps IoU; try --quantile 0.02 (NetDissect's 0.005 was set for "
                  f"large images)", file=sys.stderr)
    out = Path(output_dir)
    meta = {"method": "iou", "checkpoint": checkpoint, "torchvision_model": torchvision_model,
            "weights": weights_record(checkpoint, torchvision_model, torchvision_weights), "probe": probe.name,
            "quantile": quantile, "iou_threshold": iou_threshold}
    write_tables(out, results, meta)
    if html:
        ds = probe.network_dataset()
        maps = {l: (lambda idx, l=l: spatial_maps(net, l, ds, idx, dev)) for l in layers}
        from lwta_vision.dissect.recording import order_by_image
        from lwta_vision.dissect.report import ground_truth_concepts

        acts = {l: order_by_image(r, len(probe)) for l, r in records.items()} if text else None
        write_html(out, results, probe.raw, maps, images_per_unit=images_per_unit,
                   title=f"Network Dissection on {probe.name}", extra_columns=extra, meta=meta,
                   activations=acts, image_concepts=ground_truth_concepts(probe.dataset))
    print(f"wrote {output_dir}/ ({'index.html, ' if html else ''}<layer>.csv/.json, summary.json)")
    return {l: r.summary for l, r in results.items()}
