"""Write dissection results: per-layer CSV and JSON, and a static HTML page with top images.

Everything goes into one output folder; every file is written atomically (temp file + rename), so an
interrupted run never leaves a half-written table that looks complete.
"""
from __future__ import annotations

import csv
import html
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lwta_vision.dissect.engine import NEAR_TIE_FACTOR, LayerLabels

CSV_FIELDS = ["layer", "unit", "label", "score", "label_2", "score_2", "label_3", "score_3", "win_rate",
              "input_rate", "active", "top_images", "margin", "decided_by", "tie_margin",
              "label_corr", "label_auprc", "label_base_rate"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file and a rename; the file gets the permissions of an ordinary ``open`` (umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def safe_name(layer: str) -> str:
    return layer.replace("/", "_").replace(".", "_") or "model"


def layer_csv(labels: LayerLabels) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for row in labels.rows:
        d = row.as_dict()
        d["top_images"] = " ".join(map(str, d["top_images"]))
        w.writerow(d)
    return buf.getvalue()


def write_tables(out_dir: Path, results: dict[str, LayerLabels], meta: Optional[dict] = None) -> dict[str, Path]:
    """``<layer>.csv`` and ``<layer>.json`` per layer plus ``summary.json``; returns the written paths."""
    out_dir = Path(out_dir)
    paths = {}
    for layer, labels in results.items():
        stem = safe_name(layer)
        atomic_write_text(out_dir / f"{stem}.csv", layer_csv(labels))
        payload = {"layer": layer, "summary": labels.summary, "units": [r.as_dict() for r in labels.rows]}
        atomic_write_text(out_dir / f"{stem}.json", json.dumps(payload, indent=1))
        paths[layer] = out_dir / f"{stem}.csv"
    summary = {"meta": meta or {}, "layers": {k: v.summary for k, v in results.items()}}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    return paths


def _heat(img: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Overlay a [h, w] activation map (any resolution) on an RGB uint8 image as a red-yellow heatmap."""
    h, w = img.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    up = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    lo, hi = float(up.min()), float(up.max())
    norm = (up - lo) / (hi - lo) if hi > lo else np.zeros_like(up)
    color = np.stack([np.ones_like(norm), norm, np.zeros_like(norm)], -1) * 255
    a = (alpha * norm)[..., None]
    return (img * (1 - a) + color * a).clip(0, 255).astype(np.uint8)


def _thumb(img: Image.Image, size: int) -> Image.Image:
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST
                      if max(img.size) <= size else Image.BILINEAR)


def write_html(
    out_dir: Path,
    results: dict[str, LayerLabels],
    raw_image: Callable[[int], Image.Image],
    maps: Optional[dict[str, Callable[[Sequence[int]], Tensor]]] = None,
    images_per_unit: int = 5,
    thumb_size: int = 96,
    title: str = "lwta_vision dissection",
    extra_columns: Optional[dict[str, dict[int, str]]] = None,
) -> Path:
    """Static ``index.html``: per layer a summary, then per unit its labels and top probe images.

    Args:
        raw_image: probe index -> RGB PIL image (untransformed).
        maps: per layer, a function returning the layer's spatial maps [n, K, h, w] for given probe
            indices (recomputed only for the images shown); layers without one get plain images.
        extra_columns: per layer, unit -> extra HTML-escaped text shown under the labels (e.g. IoU label).
    """
    out_dir = Path(out_dir)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px}.u{display:inline-block;vertical-align:top;"
             "margin:4px;padding:4px;border:1px solid #ddd;width:" + str(images_per_unit * (thumb_size + 4) + 8)
             + "px}.u.off{opacity:.45}.u img{margin:1px}.s{color:#666;font-size:85%}"
             ".t{background:#fde68a;color:#78350f;font-size:80%;padding:0 4px;border-radius:3px}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for layer, labels in results.items():
        stem = safe_name(layer)
        parts.append(f"<h2 id='{stem}'>{html.escape(layer)}</h2><table>")
        for k, v in labels.summary.items():
            parts.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>")
        parts.append("</table>")
        shown = {r.unit: r.top_images[:images_per_unit] for r in labels.rows if r.active}
        all_idx = sorted({i for v in shown.values() for i in v})
        layer_maps = None
        if maps and layer in maps and all_idx:
            layer_maps = maps[layer](all_idx)
            pos = {i: p for p, i in enumerate(all_idx)}
        for row in labels.rows:
            cls = "u" if row.active else "u off"
            parts.append(f"<div class='{cls}'><b>unit {row.unit}</b>: ")
            if row.active:
                parts.append(f"<b>{html.escape(str(row.label))}</b> <span class='s'>{row.score:.3g}</span>")
                flag = _tie_flag(row, labels.summary.get("tie_tol"))
                if flag:
                    parts.append(f" <span class='t'>{html.escape(flag)}</span>")
                alt = ", ".join(f"{html.escape(l)} ({s:.3g})" for l, s in zip(row.next_labels, row.next_scores))
                parts.append(f"<div class='s'>next: {alt}</div>")
                quality = _quality_text(row)
                if quality:
                    parts.append(f"<div class='s'>{html.escape(quality)}</div>")
            else:
                parts.append("<i>inactive (never won on the probe set)</i>")
            parts.append(f"<div class='s'>win rate {row.win_rate:.3f}, inputs {row.input_rate:.3f}</div>")
            if extra_columns and layer in extra_columns and row.unit in extra_columns[layer]:
                parts.append(f"<div class='s'>{html.escape(extra_columns[layer][row.unit])}</div>")
            for rank, i in enumerate(shown.get(row.unit, [])):
                img = raw_image(i)
                arr = np.asarray(img.convert("RGB"))
                if layer_maps is not None and layer_maps.ndim == 4:
                    arr = _heat(arr, layer_maps[pos[i], row.unit].numpy())
                rel = f"images/{stem}/u{row.unit}_{rank}.png"
                buf = io.BytesIO()
                _thumb(Image.fromarray(arr), thumb_size).save(buf, format="PNG")
                atomic_write_bytes(out_dir / rel, buf.getvalue())
                parts.append(f"<img src='{rel}' title='probe image {i}' width='{thumb_size}'>")
            parts.append("</div>")
    path = out_dir / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path


def _quality_text(row) -> str:
    """'label quality: corr 0.68, AUPRC 0.94 (chance 0.32)' where defined."""
    bits = []
    if getattr(row, "label_corr", None) is not None:
        bits.append(f"corr {row.label_corr:.2f}")
    if getattr(row, "label_auprc", None) is not None:
        chance = f" (chance {row.label_base_rate:.2f})" if row.label_base_rate is not None else ""
        bits.append(f"AUPRC {row.label_auprc:.2f}{chance}")
    return "label quality: " + ", ".join(bits) if bits else ""


def _tie_flag(row, tie_tol: Optional[float]) -> str:
    """'tie: decided by contrast' / 'near tie (margin 0.004)' / '' for a labelled unit."""
    if row.decided_by and row.decided_by != "score":
        by = f" (by {row.tie_margin:.3g})" if row.tie_margin is not None else ""
        return f"tie: decided by {row.decided_by}{by}"
    if tie_tol is not None and row.margin is not None and row.margin < NEAR_TIE_FACTOR * tie_tol:
        return f"near tie (margin {row.margin:.2g})"
    return ""


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_dnd_html(out_dir: Path, layers: dict[str, Sequence], thumb_size: int = 96,
                   title: str = "lwta_vision Describe-and-Dissect") -> Path:
    """``index.html`` for Describe-and-Dissect: per unit its labels, candidates, and the kept exemplars
    (crops marked with their box) with their captions.

    ``layers`` maps a layer name to its :class:`~lwta_vision.dissect.dnd.UnitDescription` list.
    """
    out_dir = Path(out_dir)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1em}.u{border:1px solid #ddd;margin:6px;padding:6px}"
             ".u.off{opacity:.45}.e{display:inline-block;vertical-align:top;width:" + str(thumb_size + 8)
             + "px;margin:2px;font-size:80%}.s{color:#666;font-size:85%}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for layer, descriptions in layers.items():
        stem = safe_name(layer)
        parts.append(f"<h2 id='{stem}'>{html.escape(layer)}</h2>")
        for d in descriptions:
            parts.append(f"<div class='u{'' if d.active else ' off'}'><b>unit {d.unit}</b>: ")
            if not d.active:
                parts.append("<i>inactive (never won on the probe set)</i></div>")
                continue
            if d.selection:
                best = d.selection[0]
                parts.append(f"<b>{html.escape(best.concept)}</b> <span class='s'>{best.final:.3g}</span>")
                alt = ", ".join(f"{html.escape(s.concept)} ({s.final:.3g})" for s in d.selection[1:])
                parts.append(f"<div class='s'>next: {alt}</div>")
            for note in d.notes:
                parts.append(f"<div class='s'><i>{html.escape(note)}</i></div>")
            parts.append(f"<div class='s'>candidates: {html.escape(', '.join(d.candidates))}</div>")
            for rank, e in enumerate(d.exemplars):
                rel = f"images/{stem}/u{d.unit}_{rank}.png"
                buf = io.BytesIO()
                _thumb(e.image.convert("RGB"), thumb_size).save(buf, format="PNG")
                atomic_write_bytes(out_dir / rel, buf.getvalue())
                where = f"image {e.source}" + (f", crop {e.box}" if e.box is not None else "")
                parts.append(f"<div class='e'><img src='{rel}' width='{thumb_size}' title='{html.escape(where)}'>"
                             f"<br><span class='s'>{html.escape(where)}; act {e.activation:.3g}</span>"
                             f"<br>{html.escape(e.caption)}</div>")
            parts.append("</div>")
    path = out_dir / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path
