"""Does competition keep accuracy? LWTA vs ReLU, same CNN, same budget, on real Fashion-MNIST.

    python benchmarks/fmnist_accuracy.py [--epochs 3] [--seeds 0 1] [--competitors 4]

Trains ``convnet_small`` with ReLU and with LWTA (U competitors) through the same LitClassifier and
Trainer settings (AdamW 2e-3, cosine, batch 128) and prints test accuracy side by side with the gap in
points. Claim under test: the gap is within 0.5 points. Data: /usr/share/datasets/fashion-mnist
(apt-get install dataset-fashion-mnist) or --data-dir.
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from lwta_vision.data import FashionMNISTDataModule
from lwta_vision.lit import LitClassifier


def run(act_kwargs: dict, seed: int, epochs: int, data_dir: str, workers: int) -> tuple[float, float]:
    L.seed_everything(seed, verbose=False)
    dm = FashionMNISTDataModule(data_dir=data_dir, batch_size=128, num_workers=workers, seed=0)
    model = LitClassifier(
        model="convnet_small", model_kwargs=act_kwargs, num_classes=dm.num_classes, in_channels=dm.in_channels,
        class_names=dm.class_names, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
    )
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    elapsed = time.perf_counter() - t0
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    return acc, elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--competitors", type=int, default=4)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    variants = {
        "relu": {"act": "relu"},
        f"lwta U={args.competitors}": {"act": "lwta", "act_kwargs": {"competitors": args.competitors,
                                                                     "temperature": 1.67}},
    }
    results = {k: [] for k in variants}
    for seed in args.seeds:
        for name, kw in variants.items():
            acc, sec = run(kw, seed, args.epochs, args.data_dir, args.workers)
            results[name].append(acc)
            print(f"seed {seed} {name:<10} test acc {acc:.4f}  ({sec:.0f}s)", flush=True)
    print(f"\nFashion-MNIST, convnet_small, {args.epochs} epochs, seeds {args.seeds}")
    print(f"{'variant':<12}{'mean test acc':>14}")
    for name, accs in results.items():
        print(f"{name:<12}{statistics.mean(accs):>14.4f}")
    names = list(results)
    gap = 100 * (statistics.mean(results[names[1]]) - statistics.mean(results[names[0]]))
    print(f"gap (lwta - relu): {gap:+.2f} points; claim holds (|gap| <= 0.5 or lwta better): "
          f"{gap >= -0.5}")


if __name__ == "__main__":
    main()
