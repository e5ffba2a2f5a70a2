"""The steps every method shares, one call each: record activations on a probe set, write the reports.

Torch only: the Lightning callback and dissect.py both call these functions. Labeling is each method's own
(CLIP-Dissect: :func:`lwta_vision.dissect.clip_dissect.label_records`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.labels import LayerLabels
from lwta_vision.dissect.recording import LayerRecord, record_activations, resolve_layers, spatial_maps
from lwta_vision.dissect.report import write_html, write_tables


def probe_loader(probe: ProbeSet, batch_size: int = 64, num_workers: int = 0, indices: Optional[Sequence[int]] = None):
    ds = probe.network_dataset()
    if indices is not None:
        ds = torch.utils.data.Subset(ds, list(indices))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def record_probe(
    model: nn.Module,
    layers: Sequence[str],
    probe: ProbeSet,
    top_k: int = 100,
    pooling: str = "mean",
    token_pooling: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = False,
) -> dict[str, LayerRecord]:
    resolve_layers(model, layers)  # fail before touching data
    if len(probe) == 0:
        raise ValueError(f"probe set {probe.name!r} has no images")
    loader = probe_loader(probe, batch_size, num_workers)
    return record_activations(model, layers, loader, pooling, token_pooling, top_k, device, progress)


def write_report(
    out_dir: str | Path,
    results: dict[str, LayerLabels],
    probe: ProbeSet,
    model: Optional[nn.Module] = None,
    records: Optional[dict[str, LayerRecord]] = None,
    images_per_unit: int = 5,
    meta: Optional[dict] = None,
    html: bool = True,
    device: Optional[torch.device] = None,
    extra_columns: Optional[dict] = None,
) -> Path:
    """CSV/JSON tables and (optionally) the HTML page; conv layers get activation maps recomputed for the
    shown images only. The page shows each image's recorded activation (from ``records``) and, where the
    probe dataset is annotated, its ground-truth concepts."""
    from lwta_vision.dissect.recording import order_by_image
    from lwta_vision.dissect.report import ground_truth_concepts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(out_dir, results, meta)
    if html:
        maps, activations = {}, {}
        if records is not None:
            activations = {name: order_by_image(rec, len(probe)) for name, rec in records.items()}
        if model is not None and records is not None:
            ds = probe.network_dataset()
            for name, rec in records.items():
                if rec.spatial:
                    maps[name] = lambda idx, name=name: spatial_maps(model, name, ds, idx, device)
        write_html(out_dir, results, probe.raw, maps, images_per_unit=images_per_unit,
                   title=f"lwta_vision dissection on {probe.name}", extra_columns=extra_columns,
                   activations=activations, image_concepts=ground_truth_concepts(probe.dataset), meta=meta)
    return out_dir


def __getattr__(name: str):
    if name == "label_records":  # its home before each method had its own subpackage
        from lwta_vision.dissect.clip_dissect.labeling import label_records

        return label_records
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
