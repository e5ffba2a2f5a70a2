"""Accuracy against active fraction for the quickstart network on the generated shapes: ReLU vs LWTA U=2..16.

    python benchmarks/quickstart_accuracy.py --seeds 0 1 2 3 4 --epochs 3 --num-train 4000      # RESULTS.md §5

The quickstart's model and recipe (configs/quickstart.yaml: convnet_small 32-64-128, max global pool, AdamW
3e-3, cosine, batch 64, ConceptDataModule 32x32) through LitClassifier and a Lightning Trainer, every variant
with the same data, epochs and seeds; only the activation changes and LWTA uses the layer's defaults. U=24
does not divide the 32-channel first layer, so the curve stops at U=16 (6.25% active). Prints test accuracy
(mean +- std), the gap to ReLU, and the logged ``test/win_entropy/<layer>``; ``--plot`` writes the curve.
Writes ``results/accuracy.json`` and its table in RESULTS.md (``benchmarks/results.py``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(__file__))
from fmnist_accuracy import _keep_freed_memory, _ms, plot  # noqa: E402

from lwta_vision.data import ConceptDataModule  # noqa: E402
from lwta_vision.lit import LitClassifier  # noqa: E402


def run(variant: str, seed: int, args) -> dict:
    L.seed_everything(seed, verbose=False)
    dm = ConceptDataModule(num_train=args.num_train, num_val=1000, num_test=1000, image_size=32, batch_size=64)
    act = {"act": "relu"} if variant == "relu" else {"act": "lwta", "act_kwargs": {"competitors": int(variant)}}
    model = LitClassifier(
        model="convnet_small", model_kwargs={"widths": [32, 64, 128], "global_pool": "max", **act},
        num_classes=dm.num_classes, in_channels=dm.in_channels, class_names=dm.class_names,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=args.epochs))
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    metrics = trainer.test(model, dm, verbose=False)[0]
    entropy = {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("test/win_entropy/")}
    return {"acc": metrics["test/acc"], "win_entropy": entropy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["relu", "2", "4", "8", "16"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lwta_vision.provenance import stamp

    st = stamp("", seeds=args.seeds, epochs=args.epochs, num_train=args.num_train, variants=args.variants)
    results = {v: [] for v in args.variants}
    for seed in args.seeds:
        for v in args.variants:
            r = run(v, seed, args)
            results[v].append(r)
            print(f"seed {seed} {'relu' if v == 'relu' else 'U=' + v:<6} test acc {r['acc']:.4f}", flush=True)
    relu = [r["acc"] for r in results.get("relu", [])]
    print(f"\nquickstart network on generated shapes, {args.num_train} train images, {args.epochs} epochs, "
          f"seeds {args.seeds}")
    print(f"{'variant':<8}{'active':>8}{'test acc':>20}{'gap (pts)':>11}   test/win_entropy per layer")
    for v, runs in results.items():
        accs = [r["acc"] for r in runs]
        gap = f"{100 * (statistics.mean(accs) - statistics.mean(relu)):+.2f}" if relu and v != "relu" else ""
        ent = "  ".join(f"{k} {statistics.mean(float(r['win_entropy'][k]) for r in runs):.2f}"
                        for k in runs[0]["win_entropy"])
        print(f"{'relu' if v == 'relu' else 'U=' + v:<8}{'' if v == 'relu' else f'{1 / int(v):.3f}':>8}"
              f"{_ms(accs):>20}{gap:>11}   {ent}")
    if args.plot:
        plot(results, args.plot, f"generated shapes, convnet_small 32-64-128, {args.num_train} images, "
                                 f"{args.epochs} epochs, seeds {args.seeds}")
    from results import mean_std, write_section

    table = [f"{args.num_train} training images, {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}, "
             f"{args.threads} thread(s); test accuracy on 1,000 test images.", "",
             "| variant | active | test acc | gap to ReLU (points) | " + " | ".join(f"seed {s}" for s in args.seeds)
             + " | win entropy per layer |", "|---|---|---|---|" + "---|" * len(args.seeds) + "---|"]
    for v, runs in results.items():
        accs = [r["acc"] for r in runs]
        gap = f"{100 * (statistics.mean(accs) - statistics.mean(relu)):+.2f}" if relu and v != "relu" else ""
        ent = ", ".join(f"{k} {statistics.mean(float(r['win_entropy'][k]) for r in runs):.2f}"
                        for k in runs[0]["win_entropy"])
        table.append(f"| {'ReLU' if v == 'relu' else 'U=' + v} | {'1' if v == 'relu' else f'{1 / int(v):.3f}'} | "
                     f"{mean_std(accs)} | {gap} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | {ent} |")
    argv = " ".join(sys.argv[1:])
    st["command"] = f"python benchmarks/quickstart_accuracy.py {argv}".strip()
    print(write_section("accuracy", st, {"results": results}, "\n".join(table)))


if __name__ == "__main__":
    _keep_freed_memory()
    main()
