"""Results sections as code: each benchmark writes ``results/<section>.json`` (stamped) and its tables into
RESULTS.md between ``<!-- results:<section> -->`` and ``<!-- /results:<section> -->``.

The stamp (``lwta_vision.provenance.stamp``) records the commit, the machine, the LWTA implementation that ran
and the defaults that shape the figures; ``tests/test_results.py`` fails when one of those defaults (not the
machine) has changed since, naming the section and its command. Text outside the markers is prose, written by hand about the tables inside.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
RESULTS_MD = ROOT / "RESULTS.md"


def _atomic_write(path: Path, text: str) -> None:
    from lwta_vision.dissect.report import atomic_write_text

    atomic_write_text(path, text)


def mean_std(values) -> str:
    """'0.903 ± 0.012' (sample std; one value: no ±)."""
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def stamp_line(stamp: dict) -> str:
    """One Markdown line saying what produced a table."""
    s = stamp["settings"]
    reused = (f" (networks trained at commit `{stamp['trained_at'][:12]}` with the same settings; measured again "
              f"with `--reuse`)") if stamp.get("trained_at") else ""
    return (f"*Measured {stamp['date']} at commit `{(stamp['commit'] or 'unknown')[:12]}`{reused} by "
            f"`{stamp['command']}`; "
            f"torch {stamp['torch']}, {stamp['cpu']} ({stamp['cpu_capability']}, {stamp['threads']} threads); "
            f"LWTA noise: {stamp['lwta_noise']}, noise_scale {s['lwta.noise_scale']}, temperature "
            f"{s['lwta.temperature']}; loader order v{s['loader.order_version']}; concept CLIP "
            f"{s['concept_clip.weights_sha256'][:8]}; top-image rule v{s['labels.top_image_rule']}, held-out "
            f"{s['labels.holdout']:.0%} (split v{s['labels.split_version']}), tie tolerance {s['labels.tie_tol']}.*")


def write_section(name: str, stamp: dict, data: dict, markdown: str) -> Path:
    """Write ``results/<name>.json`` and replace the section's block in RESULTS.md (appended if missing)."""
    path = RESULTS_DIR / f"{name}.json"
    _atomic_write(path, json.dumps({"section": name, "status": "current", "stamp": stamp, "data": data},
                                   indent=1) + "\n")
    begin, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    block = f"{begin}\n{stamp_line(stamp)}\n\n{markdown.strip()}\n{end}"
    text = RESULTS_MD.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    _atomic_write(RESULTS_MD, text)
    return path
