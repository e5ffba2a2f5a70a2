"""The headline across seeds: the quickstart's final-layer labels, DnD's selection and held-out label quality.

For each seed, trains the quickstart exactly as the README does (``train.py fit --config
configs/quickstart.yaml``, only ``seed_everything`` changed, so the network's initialisation and batch order
change and the data stay the quickstart's), times it, then

- labels ``fc`` with ``dissect.py evaluate`` (the concept CLIP, the default) and with the ground-truth
  scorer at scale 0.3 (its default) and 1.0 (the raw 0/1 annotations): top-1, ties (labels decided by the
  second key) and the smallest margins;
- measures Describe-and-Dissect's selection on ``fc`` and ``log_softmax`` (``dnd_selection.measure``);
- labels ``layer3`` and ``fc`` with ``dissect.py describe`` (both scorers) and reports their label quality
  held out (the images that did not choose the labels) beside the in-sample figures.

Writes ``results/quickstart.json`` and the tables of RESULTS.md §0 (``benchmarks/results.py``).

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 3 4 [--out runs/quickstart_seeds]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIG = "configs/quickstart.yaml"
COMMAND = "python benchmarks/quickstart_seeds.py --seeds {seeds}"


def train(seed: int, out: Path, extra: tuple[str, ...] = ()) -> tuple[Path, float, float]:
    from lwta_vision.cli import cli_main

    t0 = time.time()
    cli = cli_main(["fit", "--config", str(ROOT / CONFIG), "--seed_everything", str(seed),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.logger.init_args.save_dir", str(out), "--trainer.default_root_dir", str(out), *extra])
    seconds = time.time() - t0
    ckpt = max(out.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpt, seconds, float(cli.trainer.callback_metrics["val/acc"])


def evaluate(ckpt: Path, scorer: str = "auto", scale: float | None = None) -> dict:
    """``dissect.py evaluate`` on fc; ``scale`` relabels with GroundTruthScorer(scale=...) instead."""
    from lwta_vision.dissect_cli import main as dissect_main

    keys = ("top1", "top5", "ties", "min_margin", "min_tie_margin", "labels", "scorer")
    if scale is None:
        m = dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null",
                          "--scorer", scorer])
        return {k: m[k] for k in keys}
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


QUALITY = ("label_corr", "label_auprc", "label_base_rate", "label_f1_02", "label_iou_02", "label_corr_insample",
           "label_auprc_insample")


def quality(ckpt: Path, scorer: str, out: Path) -> dict:
    """Held-out and in-sample label quality of layer3 and fc (``dissect.py describe``)."""
    from lwta_vision.dissect_cli import main as dissect_main

    summaries = dissect_main(["describe", "--checkpoint", str(ckpt), "--layers", "[layer3, fc]", "--scorer", scorer,
                              "--device", "cpu", "--html", "false", "--output_dir", str(out)])
    return {layer: {k: s.get(f"mean_{k}") for k in QUALITY} | {"holdout_images": s["holdout_images"],
                                                                 "unique_labels": s["unique_labels"]}
            for layer, s in summaries.items()}


def measure_seed(seed: int, out: Path, extra: tuple[str, ...] = (), reused: dict | None = None) -> dict:
    """Train (or, with ``reused``, take the checkpoint that row was measured on) and measure one seed."""
    from dnd_selection import measure as dnd

    if reused is None:
        ckpt, seconds, val_acc = train(seed, out / f"seed{seed}", extra)
    else:
        ckpt, seconds, val_acc = Path(reused["checkpoint"]), reused["train_seconds"], reused["val_acc"]
        if not ckpt.is_file():
            raise FileNotFoundError(f"--reuse: {ckpt} (seed {seed}) is gone; train again without --reuse")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dnd_fc, dnd_lp = dnd(ckpt, tmp / "dnd"), dnd(ckpt, tmp / "dnd_lp", layer="log_softmax")
        q = {"concept_clip": quality(ckpt, "auto", tmp / "q_clip"), "ground_truth": quality(ckpt, "ground_truth",
                                                                                            tmp / "q_gt")}
    return {"seed": seed, "checkpoint": str(ckpt), "train_seconds": round(seconds, 1), "val_acc": round(val_acc, 4),
            "concept_clip": evaluate(ckpt), "ground_truth_0.3": evaluate(ckpt, scale=0.3),
            "ground_truth_1.0": evaluate(ckpt, scale=1.0),
            "dnd": {layer: {k: r[k] for k in ("units", "class_recovered", "agree_with_direct", "min_candidates",
                                              "labels")} for layer, r in (("fc", dnd_fc), ("log_softmax", dnd_lp))},
            "quality": q}


def tables(rows: list[dict]) -> str:
    from results import mean_std

    n = 6 * len(rows)
    out = ["| seed | val acc | train s | concept CLIP top-1 | ties | contrast margin | ground truth (0.3) top-1 | "
           "ties | ground truth (1.0) top-1 | DnD fc | DnD log_softmax | DnD agrees with direct (fc) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def margin(v):
        return "-" if v is None else f"{v:.3g}"

    for r in rows:
        c, g, g1, d = r["concept_clip"], r["ground_truth_0.3"], r["ground_truth_1.0"], r["dnd"]
        out.append(f"| {r['seed']} | {r['val_acc']:.4f} | {r['train_seconds']:.0f} | {round(c['top1'] * 6)}/6 | "
                   f"{c['ties']} | {margin(c['min_tie_margin'])} | {round(g['top1'] * 6)}/6 | {g['ties']} | "
                   f"{round(g1['top1'] * 6)}/6 | {d['fc']['class_recovered']}/6 | "
                   f"{d['log_softmax']['class_recovered']}/6 | {d['fc']['agree_with_direct']}/6 |")

    def total(key):
        return sum(round(r[key]["top1"] * 6) for r in rows)

    out.append(f"| total | {mean_std(r['val_acc'] for r in rows)} | | **{total('concept_clip')}/{n}** | | "
               f"| **{total('ground_truth_0.3')}/{n}** | | {total('ground_truth_1.0')}/{n} | "
               f"{sum(r['dnd']['fc']['class_recovered'] for r in rows)}/{n} | "
               f"{sum(r['dnd']['log_softmax']['class_recovered'] for r in rows)}/{n} | "
               f"{sum(r['dnd']['fc']['agree_with_direct'] for r in rows)}/{n} |")
    out += ["", "Label quality, mean over the labelled units of each layer and then mean ± std over the seeds: "
            "held out (the half of the probe that did not choose the labels) against in-sample (the half that did).",
            "", "| scorer | layer | corr held out | corr in-sample | AUPRC held out | AUPRC in-sample | chance | "
            "F1 top 2% | IoU top 2% |", "|---|---|---|---|---|---|---|---|---|"]
    for scorer in ("concept_clip", "ground_truth"):
        for layer in ("layer3", "fc"):
            q = [r["quality"][scorer][layer] for r in rows]
            out.append(f"| {scorer.replace('_', ' ')} | {layer} | {mean_std(x['label_corr'] for x in q)} | "
                       f"{mean_std(x['label_corr_insample'] for x in q)} | {mean_std(x['label_auprc'] for x in q)} | "
                       f"{mean_std(x['label_auprc_insample'] for x in q)} | "
                       f"{mean_std(x['label_base_rate'] for x in q)} | {mean_std(x['label_f1_02'] for x in q)} | "
                       f"{mean_std(x['label_iou_02'] for x in q)} |")
    return "\n".join(out)


def main() -> None:
    from lwta_vision.provenance import stamp
    from results import write_section

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default="runs/quickstart_seeds")
    p.add_argument("--smoke", action="store_true", help="1 epoch on 512 images, nothing written: checks the script")
    p.add_argument("--reuse", action="store_true",
                   help="measure again the checkpoints of results/quickstart.json (no training; its training "
                        "commit, times and accuracies are kept and the stamp says so)")
    a = p.parse_args()
    extra = ("--trainer.max_epochs", "1", "--data.init_args.num_train", "512") if a.smoke else ()
    previous = {}
    extra_stamp = {}
    if a.reuse:
        from results import RESULTS_DIR

        from lwta_vision.provenance import stale_settings

        old = json.loads((RESULTS_DIR / "quickstart.json").read_text())
        if stale_settings(old["stamp"]):
            raise SystemExit(f"--reuse: the section's networks were trained with other settings "
                             f"({stale_settings(old['stamp'])}); train again without --reuse")
        for r in old["data"]["rows"]:
            r.setdefault("checkpoint", str(next((Path(a.out) / f"seed{r['seed']}").glob("**/checkpoints/last.ckpt"))))
        previous = {r["seed"]: r for r in old["data"]["rows"]}
        extra_stamp = {"trained_at": old["stamp"].get("trained_at") or old["stamp"]["commit"],
                       "trained_with": old["stamp"].get("trained_with") or old["stamp"]["lwta_noise"]}
    st = stamp(COMMAND.format(seeds=" ".join(map(str, a.seeds))), [CONFIG], seeds=a.seeds, **extra_stamp)
    rows = []
    for seed in a.seeds:
        row = measure_seed(seed, Path(a.out), extra, previous.get(seed) if a.reuse else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.smoke:
        print(tables(rows))
        return
    print(write_section("quickstart", st, {"rows": rows}, tables(rows)))


if __name__ == "__main__":
    main()
