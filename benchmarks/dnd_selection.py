"""Describe-and-Dissect's selection stage, measured on trained generated-data networks (RESULTS.md §3).

For each checkpoint, `dissect.py dnd` labels the final layer with the ground-truth test doubles (captions
from the masks, every captioned concept a candidate, fresh generated images of each candidate), then:
- class_recovered: units whose DnD label is their class name (unit i = class i);
- agree_with_direct: units whose DnD label is the candidate whose 50 fresh images excite the unit most on
  average (a direct measurement of what the unit prefers, independent of the rank-score machinery);
- with --log-softmax, the same measurement on `--layers '[log_softmax]'`, the network's log-probabilities
  instead of its logits (a logit is meaningful only relative to the same image's other logits, while DnD
  compares one unit's values across images).

    python benchmarks/dnd_selection.py runs/quickstart/version_0/checkpoints/last.ckpt [more.ckpt ...] [--log-softmax]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def measure(ckpt: str, out_dir: str, seed: int = 0, layer: str = "fc") -> dict:
    from lwta_vision.checkpoints import load_network
    from lwta_vision.dissect.dnd.generative import GeneratedConceptImages
    from lwta_vision.dissect.dnd.selection import layer_activations
    from lwta_vision.dissect.recording import expose_log_softmax
    from lwta_vision.dissect_cli import main as dissect_main
    from lwta_vision.dissect_cli.loading import instantiate as _instantiate
    from lwta_vision.dissect_cli.loading import run_config as _run_config

    res = dissect_main(["dnd", "--checkpoint", str(ckpt), "--layers", f"[{layer}]", "--captioner", "ground_truth",
                        "--summarizer", "ground_truth", "--generator", "ground_truth", "--scorer", "ground_truth", "--output_dir", str(out_dir),
                        "--device", "cpu", "--html", "false", "--seed", str(seed)])
    units = res[layer]
    dm = _instantiate(_run_config(str(ckpt))["data"])
    model, hp = load_network(str(ckpt))
    expose_log_softmax(model)
    classes = list(hp.get("class_names") or dm.class_names)
    images = GeneratedConceptImages(image_size=dm.image_size, seed=seed + 1)  # fresh images, not DnD's own
    transform = dm.probe_set("val").transform
    concepts = sorted({c for u in units for c in u["candidates"]})
    mean = {c: layer_activations(model, layer, images(c, 50, seed), transform).mean(0) for c in concepts}
    agree = [u["label"] == max(u["candidates"], key=lambda c: float(mean[c][u["unit"]])) for u in units]
    recovered = [u["label"] == classes[u["unit"]] for u in units]
    return {"checkpoint": str(ckpt), "layer": layer, "units": len(units), "class_recovered": sum(recovered),
            "agree_with_direct": sum(agree), "labels": [u["label"] for u in units],
            "min_candidates": min(len(u["candidates"]) for u in units),
            "mean_activation": {c: [round(float(v), 2) for v in mean[c]] for c in classes if c in mean}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-softmax", action="store_true", help="also measure DnD on --layers [log_softmax]")
    args = p.parse_args()
    for ckpt in args.checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(ckpt, str(Path(tmp) / "dnd"), args.seed)
        print(json.dumps(r))
        if args.log_softmax:
            with tempfile.TemporaryDirectory() as tmp:
                print(json.dumps(measure(ckpt, str(Path(tmp) / "dnd"), args.seed, "log_softmax")))


if __name__ == "__main__":
    main()
