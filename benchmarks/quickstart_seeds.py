"""The headline across seeds: final-layer top-1 of the quickstart with the concept CLIP and with ground truth.

For each seed, trains the quickstart exactly as the README does (``train.py fit --config
configs/quickstart.yaml``, only ``seed_everything`` changed, so the network's initialisation and batch
order change and the data stay the quickstart's), times it, then labels ``fc`` with `dissect.py
evaluate` (the concept CLIP, the default) and with the ground-truth scorer at scale 0.3 (its default) and
1.0 (the raw 0/1 annotations), reporting top-1, ties (labels decided by the second key) and the smallest
margin. Results go to RESULTS.md §0.

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 [--out runs/quickstart_seeds]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(seed: int, out: Path, extra: tuple[str, ...] = ()) -> tuple[Path, float, float]:
    from lwta_vision.cli import cli_main

    t0 = time.time()
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--seed_everything", str(seed),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.logger.init_args.save_dir", str(out), "--trainer.default_root_dir", str(out), *extra])
    seconds = time.time() - t0
    ckpt = max(out.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpt, seconds, float(cli.trainer.callback_metrics["val/acc"])


def evaluate(ckpt: Path, scorer: str = "auto", scale: float | None = None) -> dict:
    """``dissect.py evaluate`` on fc; ``scale`` relabels with GroundTruthScorer(scale=...) instead."""
    from lwta_vision.dissect_cli import main as dissect_main

    if scale is None:
        m = dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null",
                          "--scorer", scorer])
        return {k: m[k] for k in ("top1", "top5", "ties", "min_margin", "min_tie_margin", "labels", "scorer")}
    from lwta_vision.dissect.clip_dissect.labeling import label_records
    from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer
    from lwta_vision.dissect.evaluate.final_layer import label_accuracy
    from lwta_vision.dissect.pipeline import record_probe
    from lwta_vision.dissect_cli.loading import load_inputs as _load

    net, probe, classes = _load(str(ckpt), None, None, None, "val", None)
    rec = record_probe(net, ["fc"], probe)
    gt = GroundTruthScorer.from_dataset(probe.dataset, scale=scale)
    res = label_records(rec, gt.similarity(probe, gt.concept_names), gt.concept_names)["fc"]
    acc = label_accuracy(res.top_labels(5, gt.concept_names), classes)
    margins = [r.margin for r in res.rows if r.margin is not None]
    tie_margins = [r.tie_margin for r in res.rows if r.tie_margin is not None]
    return {**acc, "ties": res.summary["ties"], "min_margin": min(margins),
            "min_tie_margin": min(tie_margins, default=None), "labels": res.labels,
            "scorer": f"GroundTruthScorer(scale={scale})"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/quickstart_seeds")
    a = p.parse_args()
    rows = []
    for seed in a.seeds:
        ckpt, seconds, val_acc = train(seed, Path(a.out) / f"seed{seed}")
        row = {"seed": seed, "train_seconds": round(seconds, 1), "val_acc": round(val_acc, 4),
               "concept_clip": evaluate(ckpt), "ground_truth_0.3": evaluate(ckpt, scale=0.3),
               "ground_truth_1.0": evaluate(ckpt, scale=1.0)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for key in ("concept_clip", "ground_truth_0.3", "ground_truth_1.0"):
        top1 = sum(round(r[key]["top1"] * 6) for r in rows)
        ties = sum(r[key]["ties"] for r in rows)
        tm = [r[key]["min_tie_margin"] for r in rows if r[key]["min_tie_margin"] is not None]
        print(f"{key}: top-1 {top1}/{6 * len(rows)}, ties {ties}, smallest margin "
              f"{min(r[key]['min_margin'] for r in rows):.3g}, smallest contrast margin in a tie "
              f"{min(tm) if tm else float('nan'):.3g}")


if __name__ == "__main__":
    main()
