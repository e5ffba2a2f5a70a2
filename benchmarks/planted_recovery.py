"""Planted neurons: does each describer name the concept a hidden unit was trained to detect? (RESULTS.md §4)

For each seed, trains ``configs/planted.yaml`` exactly as a user would (``train.py fit``; only the seeds of
the network and of the data change; the dissection callback is switched off to save time), then labels the
planted layers with:

- soft-WPMI with ground truth (``GroundTruthScorer``), prior log p(t) over the active units (our default)
  and over all units (CLIP-Dissect's code);
- soft-WPMI with the concept CLIP shipped in lwta_vision (both priors);
- Network Dissection's IoU (``dissect.netdissect.iou_dissect``);
- Describe-and-Dissect's selection with the ground-truth doubles (``dissect.py dnd``, planted units only).

and reports per method the share of planted units whose top label is the planted concept. It also gives the
label-quality metrics (``label_corr``, ``label_auprc`` against ground truth) of each planted unit for its
planted concept and for a random other concept of the same category (the control), and, for the free
units, their own labels' quality.

Writes ``results/planted.json`` and the tables of RESULTS.md §4 (``benchmarks/results.py``).

    python benchmarks/planted_recovery.py --seeds 0 1 2 3 4 [--out runs/planted_recovery] [--epochs 8] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
METHODS = ("gt_active", "gt_all", "clip_active", "clip_all", "iou", "dnd")
METHOD_NAMES = {"gt_active": "soft-WPMI, ground truth (scale 0.3), prior over active units (default)",
                "gt_all": "soft-WPMI, ground truth, prior over all units (CLIP-Dissect's code)",
                "clip_active": "soft-WPMI, the concept CLIP (default), prior over active units",
                "clip_all": "soft-WPMI, the concept CLIP, prior over all units",
                "iou": "Network Dissection IoU (quantile 0.005, NetDissect-Lite's union)",
                "dnd": "Describe-and-Dissect selection, ground-truth doubles"}
CONFIG = "configs/planted.yaml"


def train(seed: int, out: Path, epochs: int | None = None, extra: tuple[str, ...] = ()) -> tuple[Path, float, float]:
    from lwta_vision.cli import cli_main

    t0 = time.time()
    args = ["fit", "--config", str(ROOT / "configs" / "planted.yaml"), "--seed_everything", str(seed),
            "--data.init_args.seed", str(seed), "--trainer.callbacks=[]", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.default_root_dir", str(out), *extra]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = cli_main(args)
    ckpt = max(out.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return ckpt, time.time() - t0, float(cli.trainer.callback_metrics["val/acc"])


def measure(ckpt: Path, max_images: int | None = None, with_dnd: bool = True, seed: int = 0) -> dict:
    """Recovery per method and label quality of the planted units of one checkpoint."""
    from lwta_vision.checkpoints import read_checkpoint
    from lwta_vision.concept_clip.scorer import ConceptCLIPScorer
    from lwta_vision.dissect.clip_dissect.labeling import label_layer
    from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer
    from lwta_vision.dissect.evaluate.planted import planted_from_checkpoint, recovered
    from lwta_vision.dissect.evaluate.quality import label_quality
    from lwta_vision.dissect.netdissect.iou import iou_dissect
    from lwta_vision.dissect.pipeline import record_probe
    from lwta_vision.dissect.recording import order_by_image
    from lwta_vision.dissect_cli.loading import load_inputs as _load

    planted = planted_from_checkpoint(read_checkpoint(ckpt))  # weights-only, as every entry point reads them
    if not planted:
        raise ValueError(f"{ckpt} records no planted units; train with configs/planted.yaml")
    layers = sorted({p.layer for p in planted})
    net, probe, _ = _load(str(ckpt), None, None, None, "val", max_images)
    records = record_probe(net, layers, probe)
    gt = GroundTruthScorer.from_dataset(probe.dataset)
    names = gt.concept_names
    p_gt = gt.similarity(probe, names)
    p_clip = ConceptCLIPScorer().similarity(probe, names)
    labels = {}
    gt_labels = {l: label_layer(records[l], p_gt, names) for l in layers}  # also the free units' labels below
    labels["gt_active"] = {l: r.labels for l, r in gt_labels.items()}
    labels["gt_all"] = {l: label_layer(records[l], p_gt, names, prior_units="all").labels for l in layers}
    for prior in ("active", "all"):
        labels[f"clip_{prior}"] = {l: label_layer(records[l], p_clip, names, prior_units=prior).labels for l in layers}
    labels["iou"] = {l: iou_dissect(net, l, probe)[0].labels for l in layers}
    if with_dnd:
        from lwta_vision.dissect_cli import main as dissect_main

        units = sorted({p.unit for p in planted})
        with tempfile.TemporaryDirectory() as tmp:
            res = dissect_main(["dnd", "--checkpoint", str(ckpt), "--layers", f"[{','.join(layers)}]",
                                "--units", f"[{','.join(map(str, units))}]", "--captioner", "ground_truth",
                                "--summarizer", "ground_truth", "--generator", "ground_truth", "--scorer",
                                "ground_truth", "--output_dir", tmp, "--device", "cpu", "--html", "false",
                                "--seed", str(seed)] + (["--max_images", str(max_images)] if max_images else []))
        labels["dnd"] = {l: {u["unit"]: u["label"] for u in res[l]} for l in layers}
        labels["dnd"] = {l: [labels["dnd"][l].get(u) for u in range(records[l].num_units)] for l in layers}
    out = {"checkpoint": str(ckpt), "planted": len(planted)}
    for method, by_layer in labels.items():
        ok = recovered(planted, by_layer)
        out[method] = {"recovered": sum(ok), "missed": [f"{p.layer}:{p.unit} {p.concept}->{by_layer[p.layer][p.unit]}"
                                                         for p, hit in zip(planted, ok) if not hit]}
    # label quality against ground truth: the planted concept, a random other concept of its category, and the
    # free units' own (ground-truth soft-WPMI) labels
    rng = random.Random(seed)
    cats = dict(zip(probe.dataset.concept_names, probe.dataset.concept_categories))
    quality = {"planted": [], "control": [], "free": []}
    for layer in layers:
        acts = order_by_image(records[layer], len(probe))
        mine = [p for p in planted if p.layer == layer]
        for key, pick in (("planted", lambda p: p.concept),
                          ("control", lambda p: rng.choice([c for c in names if c != p.concept and cats[c] == cats[p.concept]]))):
            lab = torch.full((acts.shape[1],), -1)
            for p in mine:
                lab[p.unit] = names.index(pick(p))
            q = label_quality(acts, p_gt, lab)
            quality[key] += [(float(q["label_corr"][p.unit]), float(q["label_auprc"][p.unit]),
                              float(q["label_base_rate"][p.unit])) for p in mine]
        free = gt_labels[layer]
        taken = {p.unit for p in mine}
        quality["free"] += [(r.label_corr, r.label_auprc, r.label_base_rate) for r in free.rows
                            if r.active and r.unit not in taken and r.label_corr is not None]
    for key, vals in quality.items():
        n = len(vals)
        out[f"quality_{key}"] = {"units": n, "corr": _mean(v[0] for v in vals), "auprc": _mean(v[1] for v in vals),
                                 "chance": _mean(v[2] for v in vals), "min_auprc": min((v[1] for v in vals), default=None)}
    return out


def _mean(values) -> float | None:
    v = [x for x in values if x is not None and x == x]
    return round(sum(v) / len(v), 4) if v else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/planted_recovery")
    p.add_argument("--epochs", type=int, default=None, help="override the config's max_epochs")
    p.add_argument("--no-dnd", action="store_true")
    p.add_argument("--reuse", action="store_true", help="measure the checkpoints already under --out (no training)")
    a = p.parse_args()
    from lwta_vision.provenance import stamp

    command = "python benchmarks/planted_recovery.py --seeds " + " ".join(map(str, a.seeds)) + (
        f" --epochs {a.epochs}" if a.epochs else "") + (" --no-dnd" if a.no_dnd else "")
    st = stamp(command, [CONFIG], seeds=a.seeds, epochs=a.epochs)
    rows = []
    for seed in a.seeds:
        found = sorted((Path(a.out) / f"seed{seed}").glob("**/checkpoints/last.ckpt")) if a.reuse else []
        if found:
            ckpt, seconds, val_acc = found[-1], float("nan"), float("nan")
        else:
            ckpt, seconds, val_acc = train(seed, Path(a.out) / f"seed{seed}", a.epochs)
        t0 = time.time()
        row = {"seed": seed, "train_seconds": round(seconds, 1), "val_acc": round(val_acc, 4),
               **measure(ckpt, with_dnd=not a.no_dnd, seed=seed)}
        row["measure_seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = sum(r["planted"] for r in rows)
    for m in METHODS:
        if m in rows[0]:
            per_seed = " ".join(f"{r[m]['recovered']}/{r['planted']}" for r in rows)
            hit = sum(r[m]["recovered"] for r in rows)
            print(f"{m:12s} recovered {hit}/{total} = {hit / total:.3f}  (per seed: {per_seed})")
    for key in ("planted", "control", "free"):
        qs = [r[f"quality_{key}"] for r in rows]
        print(f"quality {key:8s} corr {_mean(q['corr'] for q in qs)}  auprc {_mean(q['auprc'] for q in qs)}  "
              f"chance {_mean(q['chance'] for q in qs)}")
    if not a.reuse:
        from results import write_section

        print(write_section("planted", st, {"rows": rows}, tables(rows)))


def tables(rows: list[dict]) -> str:
    from results import mean_std

    seeds = " | ".join(f"seed {r['seed']}" for r in rows)
    out = [f"| method | {seeds} | total | mean ± std per seed |", "|---|" + "---|" * (len(rows) + 2)]
    total = sum(r["planted"] for r in rows)
    for m in METHODS:
        if m not in rows[0]:
            continue
        hit = sum(r[m]["recovered"] for r in rows)
        out.append(f"| {METHOD_NAMES[m]} | " + " | ".join(f"{r[m]['recovered']}/{r['planted']}" for r in rows)
                   + f" | **{hit}/{total} ({hit / total:.1%})** | {mean_std(r[m]['recovered'] for r in rows)} |")
    out += ["", "val acc per seed: " + ", ".join(f"{r['val_acc']:.3f}" for r in rows), "",
            "| units | n | label_corr | label_auprc | chance (base rate) | smallest AUPRC |", "|---|---|---|---|---|---|"]
    names = {"planted": "planted units, planted concept", "control": "planted units, random concept of the same category",
             "free": "free units, their own ground-truth soft-WPMI label (held out)"}
    for key, name in names.items():
        qs = [r[f"quality_{key}"] for r in rows]
        smallest = min((q["min_auprc"] for q in qs if q["min_auprc"] is not None), default=None)
        out.append(f"| {name} | {sum(q['units'] for q in qs)} | {mean_std(q['corr'] for q in qs)} | "
                   f"{mean_std(q['auprc'] for q in qs)} | {mean_std(q['chance'] for q in qs)} | "
                   f"{'-' if smallest is None else f'{smallest:.3f}'} |")
    missed = [f"seed {r['seed']} {m}: {', '.join(r[m]['missed'])}" for r in rows for m in METHODS
              if m in r and r[m]["missed"]]
    if missed:
        out += ["", "Missed units (layer:unit planted -> label):", ""] + [f"- {x}" for x in missed]
    return "\n".join(out)


if __name__ == "__main__":
    main()
