"""The HTML report: navigation, sort/filter controls, per-concept counts, header, tooltips, highlights."""
import html
import math
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.datasets.shapes import ShapesConceptDataset
from lwta_vision.dissect.clip_dissect.labeling import label_records
from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer
from lwta_vision.dissect.labels import LayerLabels, NeuronRow
from lwta_vision.dissect.pipeline import record_probe, write_report
from lwta_vision.dissect.recording import order_by_image
from lwta_vision.dissect.report import ground_truth_concepts, highlight, write_html, write_tables
from lwta_vision.layers import LWTA

N_IMAGES = 24


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = LWTA(4, dim=1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


class _Elements(HTMLParser):
    """Every start tag as (tag, attrs dict), in document order."""

    def __init__(self, text):
        super().__init__()
        self.items = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.items.append((tag, dict(attrs)))

    def find(self, tag=None, cls=None):
        return [a for t, a in self.items
                if (tag is None or t == tag) and (cls is None or cls in a.get("class", "").split())]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real describe-style report: tiny LWTA conv net, generated shapes with ground-truth concepts."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("report")
    data = ShapesConceptDataset(num_samples=N_IMAGES, image_size=32, seed=0, split="val")
    probe = ProbeSet(data, _to_tensor, "shapes-test")
    net = TinyConv()
    records = record_probe(net, ["act", "fc"], probe, top_k=10, batch_size=8)
    gt = GroundTruthScorer.from_dataset(data)
    results = label_records(records, gt.similarity(probe, gt.concept_names), gt.concept_names)
    meta = {"checkpoint": "runs/x/checkpoints/last.ckpt", "torchvision_model": None, "probe": probe.name,
            "num_images": len(probe), "scorer": "GroundTruthScorer", "similarity": "soft_wpmi"}
    write_report(out, results, probe, net, records, images_per_unit=4, meta=meta)
    text = (out / "index.html").read_text()
    return {"out": out, "html": text, "el": _Elements(text), "results": results, "records": records,
            "data": data, "probe": probe}


def test_page_has_navigation_sort_filter_controls_and_card_data(report):
    el, results = report["el"], report["results"]
    nav_links = [a["href"] for t, a in el.items if t == "a" and a.get("href", "").startswith("#layer-")]
    ids = {a["id"] for _, a in el.items if "id" in a}
    assert nav_links[:2] == ["#layer-act", "#layer-fc"] and all(h[1:] in ids for h in nav_links)
    assert "position:sticky" in report["html"]
    controls = el.find("div", "ctl")
    assert len(controls) == 2 and all("hidden" in c for c in controls)  # shown by the script only
    options = [a["value"] for t, a in el.items if t == "option"]
    assert {"unit", "label", "score", "margin", "win", "auprc"} <= set(options)
    assert el.find("input") and any(a.get("type") == "checkbox" for a in el.find("input"))
    assert "active only" in report["html"] and "<script>" in report["html"]
    cards = el.find("div", "u")
    assert len(cards) == sum(len(r.rows) for r in results.values())
    act_cards = cards[: len(results["act"].rows)]
    assert [int(c["data-unit"]) for c in act_cards] == list(range(8))  # unit order without JS
    for card, row in zip(act_cards, results["act"].rows):
        assert card["data-label"] == (row.label or "").lower()
        assert card["data-active"] == ("1" if row.active else "0")
        for key, value in (("score", row.score), ("margin", row.margin), ("win", row.win_rate),
                           ("auprc", row.label_auprc)):
            assert (card[f"data-{key}"] == "") if value is None else math.isclose(float(card[f"data-{key}"]),
                                                                                  value, rel_tol=1e-5)
    assert "grid-template-columns:repeat(auto-fill,minmax(" in report["html"] and "508px" not in report["html"]


def test_units_per_concept_counts_are_clickable(report):
    text = report["html"]
    for layer, labels in report["results"].items():
        section = text[text.index(f"id='layer-{layer}'"):]
        section = section[: section.find("<section", 1) if "<section" in section[1:] else None]
        shown = dict(re.findall(r"data-concept='([^']*)'[^>]*>[^<]*</a></td><td class='n'>(\d+)</td>", section))
        expected = Counter(r.label.lower() for r in labels.rows if r.active and r.label)
        assert {k: int(v) for k, v in shown.items()} == dict(expected)
        counts = [int(v) for v in re.findall(r"</a></td><td class='n'>(\d+)</td>", section)]
        assert counts == sorted(counts, reverse=True)


def test_header_shows_meta_and_links_to_files_that_exist(report):
    text, out = report["html"], report["out"]
    assert "runs/x/checkpoints/last.ckpt" in text and "GroundTruthScorer" in text and "shapes-test" in text
    assert "probe set" in text and "torchvision model" not in text  # None values are left out
    hrefs = [a["href"] for t, a in report["el"].items if t == "a" and "href" in a and not a["href"].startswith("#")]
    assert {"summary.json", "act.csv", "act.json", "fc.csv", "fc.json"} <= set(hrefs)
    srcs = [a["src"] for a in report["el"].find("img")]
    assert srcs and all((out / p).is_file() for p in hrefs + srcs)


def test_tooltips_show_activation_and_ground_truth_concepts(report):
    records, data = report["records"], report["data"]
    acts = order_by_image(records["act"], N_IMAGES)
    presence = data.presence_matrix()
    rows = {r.unit: r for r in report["results"]["act"].rows}
    checked = 0
    for img in report["el"].find("img"):
        m = re.fullmatch(r"images/act/u(\d+)_(\d+)\.png", img["src"])
        if not m:
            continue
        unit, rank = int(m[1]), int(m[2])
        i = rows[unit].top_images[rank]
        title = img["title"]
        assert title.startswith(f"probe image {i} · activation ")
        value = float(re.search(r"activation (\S+)", title)[1])
        assert value == pytest.approx(float(acts[i, unit]), rel=1e-3, abs=1e-4)
        names = [c for c, p in zip(data.concept_names, presence[i].tolist()) if p > 0]
        assert title.endswith("concepts: " + ", ".join(names))
        checked += 1
    assert checked >= 4
    cards = {int(c["data-unit"]): c for c in report["el"].find("div", "u")[:8]}
    index = {c: j for j, c in enumerate(data.concept_names)}
    for unit, row in rows.items():
        if row.active:  # the fraction of the shown images annotated with the unit's label: a sort key
            shown = row.top_images[:4]
            hits = sum(presence[i, index[row.label]] > 0 for i in shown)
            assert float(cards[unit]["data-hits"]) == pytest.approx(float(hits) / len(shown))
            assert f"label present in {int(hits)}/{len(shown)} images shown" in report["html"]
    assert "<figcaption>act " in report["html"] and "✓</b>" in report["html"]


def test_no_nan_and_readable_summary_names(report):
    text = html.unescape(report["html"])
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    for readable in ("mean win rate (active units)", "mean score of the top label", "tie tolerance",
                     "ties decided by the second key", "mean label AUPRC"):
        assert readable in text
    assert "mean_win_rate_active" not in text and "mean_top_score" not in text
    assert "log p(t|k) − log p(t)" in text and "can be negative" in text
    assert "chance = the label's base rate" in text


@pytest.mark.parametrize("colour", [(255, 220, 0), (255, 140, 0), (250, 250, 250)])  # yellow, orange, white
def test_highlight_region_and_dimmed_rest_differ_in_luminance(colour):
    img = np.empty((48, 48, 3), dtype=np.uint8)
    img[:] = colour
    amap = np.zeros((6, 6), dtype=np.float32)
    amap[:, :3] = 1.0  # the unit fires on the left half
    before = img.copy()
    out = highlight(img, amap, threshold=0.5)
    assert np.array_equal(img, before) and out.dtype == np.uint8 and out.shape == img.shape
    lum = out.astype(float) @ [0.2126, 0.7152, 0.0722]
    inside, outside = lum[:, :20].mean(), lum[:, 28:].mean()
    assert inside > 2.0 * outside and inside - outside > 80
    assert np.array_equal(out[:, :20], img[:, :20])  # the region keeps its colours
    ring = (out == 255).all(-1) & ~(img == 255).all(-1)
    assert ring[:, 22:27].any() and not ring[:, :20].any()  # a contour at the boundary only
    nothing = highlight(img, amap, threshold=2.0)  # above the map everywhere: all dimmed, no contour
    assert (nothing == out[0, -1]).all()


def _iou_like() -> LayerLabels:
    """IoU results as iou._layer_labels makes them: score = IoU, no margin, one unit without a label."""
    rows = [NeuronRow("conv", 0, "red", 0.12, ["square"], [0.05], 0.3, 0.9, True, [0, 1, 2]),
            NeuronRow("conv", 1, None, 0.0, [], [], 0.2, 0.8, True, [3, 4, 5]),
            NeuronRow("conv", 2, "stripes", 0.01, [], [], 0.0, 0.0, False, [6, 7, 8])]
    summary = {"layer": "conv", "units": 3, "active_units": 2, "method": "iou", "quantile": 0.005,
               "iou_threshold": 0.04, "detectors": 1, "per_category": {"shape": 0, "colour": 1},
               "mean_iou": float("nan")}
    return LayerLabels("conv", rows, summary)


def test_old_style_write_html_call_still_works(tmp_path):
    """dissect_cli.iou's call: positional maps, no activations/meta; captions fall back to the map mean."""
    results = {"conv": _iou_like()}
    write_tables(tmp_path, results, {"method": "iou"})
    raw = lambda i: Image.fromarray(np.full((16, 16, 3), (255, 160, 0), dtype=np.uint8))
    maps = {"conv": lambda idx: torch.rand(len(idx), 3, 4, 4)}
    path = write_html(tmp_path, results, raw, maps, images_per_unit=3, title="Network Dissection on x",
                      extra_columns={"conv": {0: "text label: red"}})
    text = path.read_text()
    assert "Network Dissection on x" in text and "text label: red" in text and "(mean of its map)" in text
    assert "score (IoU)" in text and "top 0.5% of its activations" in text and "detector above 0.04" in text
    assert "mean IoU of the detectors" in text and "detectors per category" in text and "colour 1" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE) and "—" in text
    assert "value='margin'" not in text  # no card has one
    assert "detector</span>" in text and "<i>no label</i>" in text and "None" not in text
    assert re.findall(r"data-concept='([^']*)'", text) == ["red"]  # detectors only
    assert len(list((tmp_path / "images" / "conv").glob("*.png"))) == 6  # active units only
    write_html(tmp_path, results, raw)  # no maps at all: plain images
    assert "<figcaption>" not in (tmp_path / "index.html").read_text()


def test_ground_truth_concepts_only_for_annotated_datasets():
    data = ShapesConceptDataset(num_samples=4, image_size=32, split="val")
    concepts = ground_truth_concepts(data)
    assert concepts(0) == [c for c, p in zip(data.concept_names, data.presence_matrix()[0].tolist()) if p]
    assert ground_truth_concepts(torch.utils.data.TensorDataset(torch.zeros(2, 3))) is None


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium to run the page's script")
def test_script_sorts_and_filters_in_a_browser(report, tmp_path):
    probe_page = report["out"] / "_probe_script.html"
    probe_page.write_text(report["html"] + """<script>
var sec = document.getElementById('layer-act'), sel = sec.querySelector('select');
sel.value = 'score'; sel.dispatchEvent(new Event('change'));
var order = [].map.call(sec.querySelectorAll('.grid > .u'), function (c) { return c.dataset.unit; }).join(',');
var box = sec.querySelector('input[type=checkbox]'); box.checked = true; box.dispatchEvent(new Event('change'));
var concept = sec.querySelector('[data-concept]'); concept.click();
var shown = [].filter.call(sec.querySelectorAll('.grid > .u'), function (c) { return !c.hidden; })
  .map(function (c) { return c.dataset.unit; }).join(',');
var hidden = sec.querySelector('.ctl').hidden;
document.body.setAttribute('data-probe', order + '|' + concept.dataset.concept + '|' + shown + '|' + hidden);
</script>""")
    try:
        run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                              "--dump-dom", probe_page.as_uri()], capture_output=True, text=True, timeout=60,
                             check=False)
    finally:
        probe_page.unlink()
    found = re.search(r'data-probe="([^"]*)"', run.stdout)
    assert found, f"the page's script did not run in {CHROMIUM}: {run.stderr[-1000:]}"
    order, concept, shown, hidden = found[1].split("|")
    rows = report["results"]["act"].rows
    by_score = sorted(rows, key=lambda r: (r.score is None, -(r.score or 0.0)))
    assert [int(u) for u in order.split(",")] == [r.unit for r in by_score]
    assert [int(u) for u in shown.split(",")] == sorted(
        (r.unit for r in rows if r.active and (r.label or "").lower() == concept),
        key=lambda u: -rows[u].score)
    assert hidden == "false"
