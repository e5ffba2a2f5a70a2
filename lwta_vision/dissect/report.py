"""Write dissection results: per-layer CSV and JSON, and a static HTML page with top images.

The page is one self-contained file (inline CSS and a few lines of inline JS to sort and filter the unit
cards, thumbnails beside it): it opens offline, from a folder or an archive. Everything goes into one
output folder; every file is written atomically (temp file + rename), so an interrupted run never leaves a
half-written table that looks complete.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from lwta_vision.dissect.labels import NEAR_TIE_FACTOR, QUALITY_NAMES, LayerLabels

CSV_FIELDS = ["layer", "unit", "label", "score", "label_2", "score_2", "label_3", "score_3", "win_rate",
              "input_rate", "active", "top_images", "margin", "decided_by", "tie_margin",
              *QUALITY_NAMES]


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


HIGHLIGHT_LEVEL = 0.5
"""A unit's region on an image: where its upsampled map exceeds this fraction of its range over the shown images."""

SUMMARY_NAMES = {
    "layer": "layer",
    "units": "units",
    "active_units": "active units (won at least once)",
    "active_fraction": "fraction of units active",
    "mean_win_rate_active": "mean win rate (active units)",
    "mean_input_rate_active": "mean fraction of images it fires on (active units)",
    "similarity": "similarity",
    "unique_labels": "distinct labels",
    "mean_top_score": "mean score of the top label",
    "tie_tol": "tie tolerance",
    "ties": "ties decided by the second key",
    "near_ties": "near ties (margin < 10 x tolerance)",
    "mean_label_corr": "mean label correlation",
    "mean_label_auprc": "mean label AUPRC",
    "mean_label_base_rate": "mean label base rate (AUPRC's chance)",
    "images": "probe images",
    "method": "method",
    "quantile": "activation quantile of a unit's map",
    "iou_threshold": "IoU threshold of a detector",
    "detectors": "detectors (IoU above the threshold)",
    "detector_fraction": "fraction of units that are detectors",
    "unique_concepts": "distinct detected concepts",
    "per_category": "detectors per category",
    "mean_iou": "mean IoU of the detectors",
    "best_iou": "best IoU of any unit",
    "text_agreement": "agreement with the text labels (detectors)",
    # run metadata (the ``meta`` dict of summary.json)
    "checkpoint": "checkpoint",
    "torchvision_model": "torchvision model",
    "probe": "probe set",
    "num_images": "probe images",
    "concepts": "concept set",
    "num_concepts": "concepts",
    "scorer": "scorer",
}
"""Readable names of summary and metadata keys; any other key is shown with underscores as spaces."""

SCORE_NOTES = {
    "soft_wpmi": "score (soft-WPMI): log p(t|k) − log p(t) in nats — how much more the unit's top images show the "
                 "concept than the layer's units' top images do on average; 0 = average, and it can be negative (less "
                 "than the average unit: common when the concept is widespread in the layer)",
    "wpmi": "score (WPMI): log p(t|k) − λ log p(t) over the unit's top images — how much more they show the "
            "concept than the layer's units' top images do; can be negative",
    "cos_similarity": "score (cosine): cosine over the probe images between the unit's activation and the concept's "
                      "signal, in [−1, 1]",
    "cos_similarity_cubed": "score (cubed cosine): cosine of the centred, cubed activation and concept signal over the "
                            "probe images, in [−1, 1]",
    "rank_reorder": "score (rank reorder): minus the error of re-ranking the unit's top images by the concept, "
                    "relative to a random order; 0 = perfect, always ≤ 0",
    "iou": "score (IoU): overlap of the unit's thresholded map (top {quantile} of its activations) with the concept's "
           "masks, in [0, 1]; a detector above {iou_threshold}",
    "margin": "margin: the label's score minus the runner-up's (a tie within the tolerance is decided by a second "
              "key and flagged)",
    "label_corr": "corr: Pearson correlation of the activation with the label's signal, over the held-out probe "
                  "images (the {holdout} that did not choose the label: a best-of-many choice scored on its own images "
                  "looks better than it is); 0 = chance",
    "label_auprc": "AUPRC: average precision of the activation at detecting the label's presence ({presence}), on the "
                   "held-out images; chance = the label's base rate (in brackets); F1/IoU of the unit's top 0.5% and 2% "
                   "of the images are in the CSV",
    "label_insample": "in-sample corr/AUPRC (CSV: *_insample) are the same figures on the images that chose the label",
    "win_rate": "win rate: fraction of (image, position) pairs where the unit is non-zero (for LWTA, wins its block)",
}
"""One line per score shown under a layer's title (``iou`` is formatted with the layer's summary)."""

SORT_KEYS = {"unit": "unit", "label": "label", "score": "score", "margin": "margin", "win": "win rate",
             "auprc": "label AUPRC", "corr": "label corr", "hits": "label in shown images"}
"""Card sort keys (``data-*`` attribute -> menu text); keys no card of a layer has are left out of its menu."""


def readable(key: str) -> str:
    """The display name of a summary or metadata key."""
    return SUMMARY_NAMES.get(key, str(key).replace("_", " "))


def upsample_map(amap: np.ndarray, h: int, w: int) -> np.ndarray:
    """A [h', w'] map bilinearly resized to [h, w] (float32); values stay within the map's range."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def highlight(img: np.ndarray, amap: np.ndarray, threshold: float, dim: float = 0.4,
              contour: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """NetDissect-style highlight: the image at full brightness where the map is >= ``threshold``, with a
    one-pixel contour around that region, and dimmed (x ``dim``) and mostly desaturated elsewhere.

    Why not a colour overlay: a red-yellow heatmap vanishes on red, orange and yellow images; a difference in
    brightness is legible on any image.

    Args:
        img: [h, w, 3] uint8 RGB.
        amap: [h', w'] activation map at any resolution (upsampled bilinearly to the image).
        threshold: map value from which a pixel counts as the unit's region.
        dim: brightness factor outside the region.
        contour: RGB of the contour, drawn on the pixels just outside the region.

    Returns:
        [h, w, 3] uint8.
    """
    h, w = img.shape[:2]
    rgb = img[..., :3].astype(np.float32)
    mask = upsample_map(amap, h, w) >= threshold
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    dimmed = dim * (0.25 * rgb + 0.75 * grey[..., None])
    out = np.where(mask[..., None], rgb, dimmed)
    grown = mask.copy()  # 4-neighbour dilation: the ring just outside the region
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    out[grown & ~mask] = contour
    return out.clip(0, 255).round().astype(np.uint8)


def ground_truth_concepts(dataset) -> Optional[Callable[[int], list[str]]]:
    """Probe index -> names of the concepts annotated in that image, for a dataset with ``presence_matrix()``
    and ``concept_names`` (the generated shapes data, Broden); ``None`` for any other dataset.

    The presence matrix is read on the first call only (a report without images never pays for it).
    """
    if not (hasattr(dataset, "presence_matrix") and hasattr(dataset, "concept_names")):
        return None
    names = [str(c) for c in dataset.concept_names]
    cache: list[Tensor] = []

    def concepts(i: int) -> list[str]:
        if not cache:
            cache.append(torch.as_tensor(dataset.presence_matrix()).cpu())
        return [names[j] for j in torch.nonzero(cache[0][i] > 0).flatten().tolist()]

    concepts.vocabulary = frozenset(names)  # what counts as a ground-truth concept (a CLIP word may not)
    return concepts


def _thumb(img: Image.Image, size: int) -> Image.Image:
    scale = size / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST
                      if max(img.size) <= size else Image.BILINEAR)


_CSS = """
*{box-sizing:border-box}[hidden]{display:none!important}
body{font:14px/1.35 system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f7f9}
nav{position:sticky;top:0;z-index:9;background:#24292f;color:#fff;padding:6px 16px;display:flex;gap:14px;
 align-items:baseline;flex-wrap:wrap}
nav a{color:#9ecbff;text-decoration:none}nav a:hover{text-decoration:underline}nav .t{font-weight:600;color:#fff}
main{padding:0 16px 24px}h1{font-size:20px;margin:14px 0 6px}h2{font-size:18px;margin:0 0 4px}
a{color:#0969da}
section{scroll-margin-top:40px;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:12px;margin:14px 0}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #eaeef2;padding:2px 8px;text-align:left;
 vertical-align:top}th{font-weight:500;color:#57606a}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:1px 18px;font-size:13px}
.kv div{border-bottom:1px solid #eaeef2;padding:1px 0;display:flex;justify-content:space-between;gap:8px}
.kv span{color:#57606a}.kv b{font-weight:500;font-variant-numeric:tabular-nums;white-space:nowrap;text-align:right}
.kv .w{grid-column:1/-1;justify-content:flex-start;gap:16px}.kv .w b{white-space:normal;overflow-wrap:anywhere}
.meta{margin-bottom:4px}.meta.kv{grid-template-columns:repeat(auto-fill,minmax(300px,1fr))}
.s{color:#57606a;font-size:12px}
.notes{margin:2px 0 8px;padding-left:18px;color:#57606a;font-size:12px;columns:2 520px;column-gap:28px}
.top{display:flex;gap:24px;align-items:flex-start;margin-bottom:6px}.top .kv{flex:1 1 auto}
.cc{max-height:12.5em;overflow:auto;border:1px solid #eaeef2}.cc a{cursor:pointer}
.bar{display:inline-block;height:8px;background:#8cb4ff;border-radius:2px}
.ctl{display:flex;gap:10px;align-items:center;flex-wrap:wrap;background:#f6f8fa;border:1px solid #d0d7de;
 border-radius:6px;padding:6px 8px;margin:8px 0;position:sticky;top:30px;z-index:5}
.ctl input[type=search]{width:16em}.ctl button{min-width:2.4em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(%(card)dpx,1fr));gap:8px}
.u{border:1px solid #d0d7de;border-radius:6px;padding:6px;background:#fff;min-width:0}
.u.off{opacity:.5}.u .h{display:flex;gap:6px;align-items:baseline;flex-wrap:wrap}
.lab{font-size:15px}.lab.weak{color:#6e7781;font-weight:500}.sc{color:#57606a;font-variant-numeric:tabular-nums}
.tag{background:#fde68a;color:#78350f;font-size:11px;padding:0 4px;border-radius:3px}
.tag.d{background:#dafbe1;color:#116329}
.ims{display:grid;grid-template-columns:repeat(%(n)d,1fr);gap:3px;margin-top:4px}
figure{margin:0;min-width:0}figure img{width:100%%;height:auto;display:block;border-radius:2px}
figcaption{font-size:11px;line-height:1.2;color:#57606a;overflow:hidden;display:-webkit-box;-webkit-line-clamp:3;
 -webkit-box-orient:vertical;word-break:break-word}figcaption b{color:#1f2328}
"""

_JS = """
document.querySelectorAll('section.layer').forEach(function (sec) {
  var ctl = sec.querySelector('.ctl'), grid = sec.querySelector('.grid');
  if (!ctl || !grid) return;
  ctl.hidden = false;
  var cards = Array.prototype.slice.call(grid.children), desc = false;
  var key = ctl.querySelector('select'), rev = ctl.querySelector('button');
  var text = ctl.querySelector('input[type=search]');
  var act = ctl.querySelector('input[type=checkbox]'), count = ctl.querySelector('.count');
  function value(c, k) { var v = c.dataset[k]; return v === '' || v === undefined ? null : (k === 'label' ? v : +v); }
  function update() {
    var k = key.value, q = text.value.trim().toLowerCase(), exact = q.charAt(0) === '=', shown = 0;
    if (exact) q = q.slice(1).trim();
    cards.forEach(function (c) {
      var l = c.dataset.label;
      var ok = (!act.checked || c.dataset.active === '1') && (!q || (exact ? l === q : l.indexOf(q) >= 0));
      c.hidden = !ok; if (ok) shown++;
    });
    cards.slice().sort(function (a, b) {
      var x = value(a, k), y = value(b, k);
      if (x === null || y === null) return (x === null) - (y === null);  // missing values last, either way
      return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1);
    }).forEach(function (c) { grid.appendChild(c); });
    count.textContent = shown + ' of ' + cards.length + ' units';
    rev.textContent = desc ? '↓' : '↑';
  }
  key.addEventListener('change', function () { desc = key.value !== 'unit' && key.value !== 'label'; update(); });
  rev.addEventListener('click', function () { desc = !desc; update(); });
  text.addEventListener('input', update); act.addEventListener('change', update);
  sec.querySelectorAll('[data-concept]').forEach(function (a) {
    a.addEventListener('click', function (e) {
      e.preventDefault(); text.value = '=' + a.dataset.concept; update(); ctl.scrollIntoView({block: 'nearest'});
    });
  });
  update();
});
"""


def write_html(
    out_dir: Path,
    results: dict[str, LayerLabels],
    raw_image: Callable[[int], Image.Image],
    maps: Optional[dict[str, Callable[[Sequence[int]], Tensor]]] = None,
    images_per_unit: int = 5,
    thumb_size: int = 96,
    title: str = "lwta_vision dissection",
    extra_columns: Optional[dict[str, dict[int, str]]] = None,
    activations: Optional[dict[str, Tensor]] = None,
    image_concepts: Optional[Callable[[int], Sequence[str]]] = None,
    meta: Optional[dict] = None,
) -> Path:
    """Static ``index.html``: a header with the run, then per layer its summary, units per concept, and one
    card per unit with its labels and highlighted top images; cards sort and filter with a little inline JS.

    One self-contained page (inline CSS and JS, images beside it): it opens from a folder or an archive with
    no network, and without JS it still shows everything in unit order.

    Args:
        raw_image: probe index -> RGB PIL image (untransformed).
        maps: per layer, a function returning the layer's spatial maps [n, K, h, w] for given probe
            indices (recomputed only for the images shown); layers without one get plain images.
        extra_columns: per layer, unit -> extra text shown under the labels (e.g. the IoU label).
        activations: per layer, the pooled activations [N, K] with row i = probe image i (see
            :func:`~lwta_vision.dissect.recording.order_by_image`), shown under each image; without it,
            layers with maps show the mean of the unit's map.
        image_concepts: probe index -> the ground-truth concepts of that image (see
            :func:`ground_truth_concepts`), shown under each image.
        meta: the run's metadata (checkpoint, probe, scorer, ...), shown in the header.
    """
    out_dir = Path(out_dir)
    css = _CSS % {"card": max(260, images_per_unit * 74 + 14), "n": max(1, images_per_unit)}
    stems = {layer: safe_name(layer) for layer in results}
    nav = ("<nav><span class='t'>" + _e(title) + "</span>"
           + "".join(f"<a href='#layer-{_e(s)}'>{_e(layer)}</a>" for layer, s in stems.items())
           + (" <a href='summary.json'>summary.json</a>" if (out_dir / "summary.json").is_file() else "")
           + "</nav>")
    parts = [f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{_e(title)}</title>",
             "<meta name='viewport' content='width=device-width,initial-scale=1'>", f"<style>{css}</style>",
             nav, "<main>", f"<h1>{_e(title)}</h1>", _header(out_dir, meta, stems)]
    for layer, labels in results.items():
        parts.append(_layer_html(out_dir, layer, stems[layer], labels, raw_image, (maps or {}).get(layer),
                                 images_per_unit, thumb_size, (extra_columns or {}).get(layer),
                                 (activations or {}).get(layer), image_concepts))
    parts.append(f"</main><script>{_JS}</script>")
    path = out_dir / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _header(out_dir: Path, meta: Optional[dict], stems: dict[str, str]) -> str:
    """The run's metadata, and links to the tables written beside the page (if they exist)."""
    rows = _kv([(k, v) for k, v in (meta or {}).items() if v is not None], wide=32)
    links = ["<a href='summary.json'>summary.json</a>"] if (out_dir / "summary.json").is_file() else []
    for layer, stem in stems.items():
        files = [f"<a href='{_e(stem)}.{ext}'>{ext.upper()}</a>" for ext in ("csv", "json")
                 if (out_dir / f"{stem}.{ext}").is_file()]
        if files:
            links.append(f"{_e(layer)}: {' '.join(files)}")
    out = f"<div class='meta kv'>{rows}</div>" if rows else ""
    return out + (f"<div class='s'>files: {' · '.join(links)}</div>" if links else "")


def _is_iou(labels: LayerLabels) -> bool:
    return labels.summary.get("method") == "iou"


def _notes(labels: LayerLabels) -> list[str]:
    """The one-line explanations of the scores this layer's cards show."""
    s = labels.summary
    if _is_iou(labels):
        q = s.get("quantile")
        quantile = f"{100 * q:.2g}%" if isinstance(q, (int, float)) else "quantile"
        return [SCORE_NOTES["iou"].format(quantile=quantile, iou_threshold=_fmt(s.get("iou_threshold", 0.04))),
                SCORE_NOTES["win_rate"]]
    sim = s.get("similarity")
    first = SCORE_NOTES.get(sim, f"score ({sim}): the similarity's value, higher = better") if sim else None
    rows = [r for r in labels.rows if r.active]
    keys = [k for k in ("margin", "label_corr", "label_auprc") if any(getattr(r, k) is not None for r in rows)]
    held = s.get("holdout")
    fill = {"holdout": f"{held:.0%}" if isinstance(held, (int, float)) else "part",
            "presence": "by CLIP: the Otsu split of the label's similarity" if s.get("presence") == "threshold"
            else "the annotations"}
    notes = [SCORE_NOTES[k].format(**fill) for k in keys]
    if any(r.label_auprc_insample is not None for r in rows):
        notes.append(SCORE_NOTES["label_insample"])
    return ([first] if first else []) + notes + [SCORE_NOTES["win_rate"]]


def _detector(row, labels: LayerLabels) -> bool:
    """A unit whose label counts: labelled, and for IoU above the detector threshold."""
    if not row.active or row.label is None:
        return False
    if _is_iou(labels):
        return row.score is not None and row.score > labels.summary.get("iou_threshold", 0.04)
    return True


def _concept_counts(labels: LayerLabels, stem: str) -> str:
    """Units per label, most first; each label filters the cards (without JS the link stays in the section)."""
    counts: dict[str, int] = {}
    for r in labels.rows:
        if _detector(r, labels):
            counts[r.label] = counts.get(r.label, 0) + 1
    if not counts:
        return ""
    what = "detectors" if _is_iou(labels) else "active labelled units"
    most = max(counts.values())
    rows = "".join(f"<tr><td><a href='#layer-{_e(stem)}' data-concept='{_e(c.lower())}' "
                   f"title='show only these units'>{_e(c)}</a></td>"
                   f"<td class='n'>{n}</td><td><span class='bar' style='width:{round(60 * n / most)}px'></span>"
                   "</td></tr>"
                   for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"<div><div class='s'>units per concept ({what}; click to filter)</div>"
            f"<div class='cc'><table><tr><th>concept</th><th colspan='2'>units</th></tr>{rows}</table></div></div>")


def _summary_table(labels: LayerLabels) -> str:
    return f"<div class='kv'>{_kv([(k, v) for k, v in labels.summary.items() if k != 'layer'], wide=16)}</div>"


def _kv(items, wide: int) -> str:
    """Name/value pairs for a ``kv`` grid; a value longer than ``wide`` characters gets a row of its own."""
    cells = []
    for key, value in items:
        text = _fmt(value)
        cls = " class='w'" if len(text) > wide else ""
        cells.append(f"<div{cls}><span>{_e(readable(key))}</span><b>{_e(text)}</b></div>")
    return "".join(cells)


def _data_attrs(row) -> dict[str, str]:
    """The card's sort and filter keys; missing values are empty (sorted last)."""
    return {"unit": str(row.unit), "label": (row.label or "").lower(), "active": "1" if row.active else "0",
            "score": _attr_num(row.score if row.label is not None else None), "margin": _attr_num(row.margin),
            "win": _attr_num(row.win_rate), "auprc": _attr_num(row.label_auprc), "corr": _attr_num(row.label_corr)}


def _attr_num(v) -> str:
    return f"{v:.6g}" if isinstance(v, (int, float)) and math.isfinite(v) else ""


def _layer_html(out_dir, layer, stem, labels, raw_image, layer_map_fn, images_per_unit, thumb_size, extra,
                acts, image_concepts) -> str:
    """One layer's section: title, score notes, summary, units per concept, controls and the unit cards."""
    shown = {r.unit: r.top_images[:images_per_unit] for r in labels.rows if r.active}
    all_idx = sorted({i for v in shown.values() for i in v})
    layer_maps = None
    if layer_map_fn is not None and all_idx:
        layer_maps = layer_map_fn(all_idx)
        layer_maps = layer_maps if layer_maps.ndim == 4 else None
    ctx = _Images(out_dir, stem, raw_image, thumb_size, acts, layer_maps, {i: p for p, i in enumerate(all_idx)},
                  {i: list(image_concepts(i)) for i in all_idx} if image_concepts is not None else None,
                  getattr(image_concepts, "vocabulary", None))
    cards, attrs = [], []
    for row in labels.rows:
        figs, hits = ctx.figures(row, shown.get(row.unit, []))
        a = _data_attrs(row)
        n = len(shown.get(row.unit, []))
        a["hits"] = _attr_num(hits / n) if hits is not None else ""
        present = f"<div class='s'>label present in {hits}/{n} images shown</div>" if hits is not None else ""
        cards.append(f"<div class='u{'' if row.active else ' off'}' "
                     + " ".join(f"data-{k}='{_e(v)}'" for k, v in a.items()) + ">"
                     + _card_text(row, labels, extra) + present + figs + "</div>")
        attrs.append(a)
    files = " · ".join(f"<a href='{_e(stem)}.{ext}'>{ext.upper()}</a>" for ext in ("csv", "json")
                       if (out_dir / f"{stem}.{ext}").is_file())
    options = "".join(f"<option value='{k}'>{_e(name)}</option>" for k, name in SORT_KEYS.items()
                      if any(a[k] for a in attrs))
    legend = []
    if layer_maps is not None:
        legend.append(f"bright, outlined: where the unit's map exceeds {HIGHLIGHT_LEVEL:.0%} of its range over the "
                      "images shown; the rest dimmed")
    if acts is not None or layer_maps is not None:
        legend.append("under each image: the unit's activation" + ("" if acts is not None else " (mean of its map)"))
    if ctx.gt:
        legend.append("then the image's ground-truth concepts, the unit's label in bold (✓)")
    return "\n".join([
        (f"<section class='layer' id='layer-{_e(stem)}'><h2>{_e(layer)} <span class='s'>"
         f"{len(labels.rows)} units{' · ' + files if files else ''}</span></h2>"),
        "<ul class='notes'>" + "".join(f"<li>{_e(n)}</li>" for n in _notes(labels)) + "</ul>",
        f"<div class='top'>{_summary_table(labels)}{_concept_counts(labels, stem)}</div>",
        ("<div class='ctl' hidden><label>sort by <select>" + options + "</select></label>"
         "<button type='button' title='reverse the order'>↑</button>"
         "<label>label <input type='search' placeholder='filter (=name: exact)'></label>"
         "<label><input type='checkbox'> active only</label><span class='count s'></span></div>"),
        f"<div class='s'>{_e('; '.join(legend))}</div>" if legend else "",
        "<div class='grid'>", *cards, "</div></section>"])


class _Images:
    """Writes a layer's thumbnails (highlighted where maps exist) and their figure HTML."""

    def __init__(self, out_dir, stem, raw_image, thumb_size, acts, maps, pos, gt, vocabulary=None):
        self.out_dir, self.stem, self.raw_image, self.thumb_size = out_dir, stem, raw_image, thumb_size
        self.acts, self.maps, self.pos, self.gt = acts, maps, pos, gt
        # the annotations' concept names; without them, a label that no shown image is annotated with is taken
        # for a word outside the annotations (e.g. a CLIP word)
        self.vocabulary = set(vocabulary) if vocabulary is not None else {c for cs in (gt or {}).values() for c in cs}

    def figures(self, row, images: Sequence[int]) -> tuple[str, Optional[int]]:
        """The unit's figures, and how many are annotated with its label (None: not a ground-truth concept)."""
        if not images:
            return "", None
        thr = None
        if self.maps is not None:
            unit_maps = self.maps[[self.pos[i] for i in images], row.unit]
            lo, hi = float(unit_maps.min()), float(unit_maps.max())
            thr = lo + HIGHLIGHT_LEVEL * (hi - lo) if hi > lo else None
        hits, figs = 0, []
        for rank, i in enumerate(images):
            arr = np.asarray(_thumb(self.raw_image(i).convert("RGB"), self.thumb_size))
            if thr is not None:
                arr = highlight(arr, self.maps[self.pos[i], row.unit].numpy(), thr)
            rel = f"images/{self.stem}/u{row.unit}_{rank}.png"
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG", optimize=True)
            atomic_write_bytes(self.out_dir / rel, buf.getvalue())
            if self.acts is not None:
                value = float(self.acts[i, row.unit])
            elif self.maps is not None:
                value = float(self.maps[self.pos[i], row.unit].mean())
            else:
                value = None
            concepts = self.gt.get(i, []) if self.gt is not None else []
            has = row.label is not None and row.label in concepts
            hits += has
            ordered = ([row.label] if has else []) + [c for c in concepts if c != row.label]
            tip = f"probe image {i}" + (f" · activation {_fmt(value)}" if value is not None else "")
            if self.gt is not None:
                tip += " · concepts: " + (", ".join(concepts) or "none annotated")
            cap = [f"act {_fmt(value, 3)}"] if value is not None else []
            if ordered:
                cap.append(", ".join((f"<b>{_e(c)} ✓</b>" if c == row.label else _e(c)) for c in ordered))
            figs.append(f"<figure><img src='{rel}' width='{arr.shape[1]}' height='{arr.shape[0]}' "
                        f"alt='{_e(tip)}' title='{_e(tip)}'>"
                        + (f"<figcaption>{'<br>'.join(cap)}</figcaption>" if cap else "") + "</figure>")
        known = self.gt is not None and row.label in self.vocabulary
        return "<div class='ims'>" + "".join(figs) + "</div>", hits if known else None


def _card_text(row, labels: LayerLabels, extra: Optional[dict[int, str]]) -> str:
    """A card's header (unit, label, score, tie flags) and its lines of numbers."""
    iou = _is_iou(labels)
    head = [f"<b>unit {row.unit}</b>"]
    if not row.active:
        head.append("<i>inactive (never won on the probe set)</i>")
    elif row.label is None:
        head.append("<i>no label</i>")
    else:
        weak = iou and not _detector(row, labels)  # an IoU label below the detector threshold: a weak guess
        lab = "class='lab weak' title='below the detector threshold'" if weak else "class='lab'"
        head.append(f"<b {lab}>{_e(row.label)}</b> <span class='sc'>{'IoU ' if iou else ''}{_fmt(row.score)}</span>")
        if iou and not weak:
            head.append("<span class='tag d'>detector</span>")
        flag = _tie_flag(row, labels.summary.get("tie_tol"))
        if flag:
            head.append(f"<span class='tag'>{_e(flag)}</span>")
    lines = []
    if row.active and row.next_labels:
        lines.append("next: " + ", ".join(f"{_e(l)} ({_fmt(s)})" for l, s in zip(row.next_labels, row.next_scores)))
    numbers = [f"margin {_fmt(row.margin)}"] if row.active and row.margin is not None else []
    numbers.append(f"win rate {row.win_rate:.3f}, inputs {row.input_rate:.3f}")
    lines.append(", ".join(numbers))
    quality = _quality_text(row)
    if quality:
        lines.append(_e(quality))
    if extra and row.unit in extra:
        lines.append(_e(extra[row.unit]))
    return (f"<div class='h'>{' '.join(head)}</div>" + "".join(f"<div class='s'>{l}</div>" for l in lines))


def _quality_text(row) -> str:
    """'held-out label quality: corr 0.68, AUPRC 0.94 (chance 0.32; in-sample 0.97)' where defined."""
    bits = []
    if getattr(row, "label_corr", None) is not None:
        bits.append(f"corr {row.label_corr:.2f}")
    if getattr(row, "label_auprc", None) is not None:
        chance = f"chance {row.label_base_rate:.2f}" if row.label_base_rate is not None else ""
        inside = getattr(row, "label_auprc_insample", None)
        inside = f"in-sample {inside:.2f}" if inside is not None else ""
        extra = "; ".join(b for b in (chance, inside) if b)
        bits.append(f"AUPRC {row.label_auprc:.2f}" + (f" ({extra})" if extra else ""))
    if bits:
        return "held-out label quality: " + ", ".join(bits)
    if getattr(row, "label_auprc_insample", None) is not None:
        return f"in-sample label quality (nothing held out): AUPRC {row.label_auprc_insample:.2f}"
    return ""


def _tie_flag(row, tie_tol: Optional[float]) -> str:
    """'tie: decided by contrast' / 'near tie (margin 0.004)' / '' for a labelled unit."""
    if row.decided_by and row.decided_by != "score":
        by = f" (by {row.tie_margin:.3g})" if row.tie_margin is not None else ""
        return f"tie: decided by {row.decided_by}{by}"
    if tie_tol is not None and row.margin is not None and row.margin < NEAR_TIE_FACTOR * tie_tol:
        return f"near tie (margin {row.margin:.2g})"
    return ""


def _fmt(v, digits: int = 4) -> str:
    """Numbers to ``digits`` significant digits; NaN and None as an em dash (never 'nan'); dicts as 'key n, ...'."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) or "—"
    return str(v)


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
