"""Does competition keep accuracy? LWTA at U = 2..24 vs ReLU, same CNN, same recipe, real Fashion-MNIST.

    python benchmarks/fmnist_accuracy.py --seeds 0 1 2 --epochs 3 --plot benchmarks/fmnist_accuracy.png

One network for every variant, ``cnn48``: conv48-bn-act-pool, conv96-bn-act-pool, fc480-bn-act, fc10. Every
width divides by U = 2, 4, 8, 16 and 24 (48 = lcm), so each variant only swaps the activation. Recipe: Adam 1e-3,
batch 128, no augmentation, the same epochs and seeds for all; LWTA evaluates with its argmax winner. Plain
torch loop on one thread (the data sit in memory), so a run is about a minute per epoch on a CPU core.

Prints test accuracy (mean +- std over seeds) and the gap to ReLU in points, with the measured active
fraction and win-rate entropy of each LWTA layer (1 = a block's units share the wins evenly, 0 = one unit
always wins); ``--plot`` writes accuracy against active fraction with the ReLU band (needs the ``bench``
extra: pip install -e '.[bench]').

``--split val`` trains on 50k of the training images and reports the 10k held out (a fixed split): this is
how settings are chosen, so the test set is not tuned on. ``--lwta '{"noise_scale": 1.0}'`` overrides the
layer's defaults (e.g. the classic noise level), ``--eval-samples S`` also reports sampled and S-sample
averaged inference. Data: /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lwta_vision.data.fashion_mnist import find_fashion_mnist_files, read_idx
from lwta_vision.layers import collect_lwta_stats, create_act, lwta_modules
from lwta_vision.layers.stats import win_entropy

WIDTHS = (48, 96, 480)  # conv, conv, fc: lcm(2, 4, 8, 16, 24) = 48 divides all three
MEAN, STD = 0.2860, 0.3530


class CNN48(nn.Module):
    """conv48-conv96-fc480 with BatchNorm before each activation; the activation is the only variable."""

    def __init__(self, act: str = "relu", act_kwargs: dict | None = None, widths=WIDTHS, bn_gamma: float = 1.0):
        super().__init__()
        c1, c2, f = widths
        kw = dict(act_kwargs or {})
        self.layer1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1),
                                    create_act(act, dim=1, width=c1, **kw), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2),
                                    create_act(act, dim=1, width=c2, **kw), nn.MaxPool2d(2))
        self.fc1 = nn.Sequential(nn.Linear(c2 * 49, f, bias=False), nn.BatchNorm1d(f),
                                 create_act(act, dim=-1, width=f, **kw))
        self.fc = nn.Linear(f, 10)
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.constant_(m.weight, bn_gamma)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.fc1(self.layer2(self.layer1(x)).flatten(1)))


def load(data_dir: str, split: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    files = find_fashion_mnist_files(data_dir)
    if files is None:
        sys.exit(f"Fashion-MNIST idx files not found under {data_dir}; apt-get install dataset-fashion-mnist "
                 f"or pass --data-dir")

    def images(key):
        return ((torch.from_numpy(read_idx(files[key]).copy()).float() / 255 - MEAN) / STD).unsqueeze(1)

    def labels(key):
        return torch.from_numpy(read_idx(files[key]).astype("int64"))

    xtr, ytr = images(("train", "images")), labels(("train", "labels"))
    if split == "test":
        return xtr, ytr, images(("test", "images")), labels(("test", "labels"))
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(12345))  # fixed, seed-independent
    tr, va = perm[10000:], perm[:10000]
    return xtr[tr], ytr[tr], xtr[va], ytr[va]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, samples: int = 0) -> dict:
    """Argmax accuracy with per-layer LWTA statistics; with ``samples``, also sampled and S-averaged accuracy."""
    model.eval()
    out = {}
    with collect_lwta_stats(model, win_rates=True) as stats:
        pred = torch.cat([model(xb).argmax(1) for xb in x.split(250)])
    out["acc"] = (pred == y).float().mean().item()
    lw = lwta_modules(model)
    out["active"] = {k: v for k, v in stats.sparsity.items()}
    out["win_entropy"] = {k: win_entropy(stats.win_rates[k], lw[k].competitors) for k in stats.win_rates}
    if samples and lw:
        for m in lw.values():
            m.eval_mode = "sample"
        probs = 0
        for s in range(samples):
            torch.manual_seed(1000 + s)
            p = torch.cat([model(xb).softmax(1) for xb in x.split(250)])
            if s == 0:
                out["acc_sample"] = (p.argmax(1) == y).float().mean().item()
            probs = probs + p
        out[f"acc_mc{samples}"] = (probs.argmax(1) == y).float().mean().item()
        for m in lw.values():
            m.eval_mode = "argmax"
    return out


def train_one(variant: str, seed: int, data, args) -> dict:
    """Train one variant ("relu" or a U) for ``args.epochs`` and evaluate it."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    if variant == "relu":
        model = CNN48("relu", bn_gamma=args.bn_gamma)
    else:
        model = CNN48("lwta", {"competitors": int(variant), **args.lwta}, bn_gamma=args.bn_gamma)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = len(xtr) if not args.train_subset else min(args.train_subset, len(xtr))
    steps = args.epochs * math.ceil(n / args.batch_size)
    layers = lwta_modules(model)
    start = {k: m.noise_scale for k, m in layers.items()}
    step, t0 = 0, time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)[:n]
        for idx in perm.split(args.batch_size):
            if args.noise_end is not None:  # linear anneal of the noise scale, start -> noise_end
                for k, m in layers.items():
                    m.noise_scale = start[k] + (args.noise_end - start[k]) * step / max(steps - 1, 1)
            if args.kl_weight:
                with collect_lwta_stats(model, sparsity=False, kl=True) as st:
                    logits = model(xtr[idx])
                loss = F.cross_entropy(logits, ytr[idx]) + args.kl_weight * st.kl_total()
            else:
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    res = evaluate(model, xte, yte, args.eval_samples)
    res.update(variant=variant, seed=seed, seconds=time.perf_counter() - t0)
    return res


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def plot(results: dict, path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"--plot needs matplotlib: pip install -e '.[bench]'; {path} not written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relu = [r["acc"] for r in results.get("relu", [])]
    fig, ax = plt.subplots(figsize=(6, 4))
    if relu:
        m = statistics.mean(relu)
        sd = statistics.stdev(relu) if len(relu) > 1 else 0.0
        ax.axhspan(m - sd, m + sd, color="tab:gray", alpha=0.3, label=f"ReLU {m:.4f} +- {sd:.4f}")
        ax.axhline(m, color="tab:gray")
    us = [int(v) for v in results if v != "relu"]
    if us:
        acc = [[r["acc"] for r in results[str(u)]] for u in us]
        mean = [statistics.mean(a) for a in acc]
        sd = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
        ax.errorbar([1 / u for u in us], mean, yerr=sd, marker="o", capsize=3, color="tab:blue", label="LWTA")
        for u, mu in zip(us, mean):
            ax.annotate(f"U={u}", (1 / u, mu), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([1 / 24, 1 / 16, 1 / 8, 1 / 4, 1 / 2], ["4.2%", "6.25%", "12.5%", "25%", "50%"])
    ax.set_xlabel("active fraction of units (1/U)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["relu", "2", "4", "8", "16", "24"],
                    help="'relu' and/or competitors U")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="test: train on 60k, report the test set; val: train on 50k, report 10k held out")
    ap.add_argument("--train-subset", type=int, default=0, help="train on the first N of each epoch's shuffle")
    ap.add_argument("--lwta", type=json.loads, default={}, help="extra LWTA arguments as JSON")
    ap.add_argument("--noise-end", type=float, default=None, help="anneal noise_scale linearly to this value")
    ap.add_argument("--kl-weight", type=float, default=0.0, help="weight of KL(q || uniform) per layer")
    ap.add_argument("--bn-gamma", type=float, default=1.0, help="initial BatchNorm scale")
    ap.add_argument("--eval-samples", type=int, default=0, help="also report sampled / S-averaged inference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--plot", default=None, help="write accuracy vs active fraction to this PNG")
    ap.add_argument("--json", default=None, help="write the per-run results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.data_dir, args.split)
    print(f"Fashion-MNIST cnn48 {'-'.join(map(str, WIDTHS))}, Adam {args.lr:g}, batch {args.batch_size}, "
          f"{args.epochs} epochs, train {len(data[0]) if not args.train_subset else args.train_subset}, "
          f"report {args.split} ({len(data[2])}), seeds {args.seeds}, lwta {args.lwta or 'defaults'}"
          + (f", noise -> {args.noise_end}" if args.noise_end is not None else "")
          + (f", kl {args.kl_weight}" if args.kl_weight else "")
          + (f", bn_gamma {args.bn_gamma}" if args.bn_gamma != 1 else ""),
          flush=True)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for v in args.variants:
            r = train_one(v, seed, data, args)
            results[v].append(r)
            extra = "".join(f" {k} {r[k]:.4f}" for k in r if k.startswith("acc_"))
            print(f"seed {seed} {'relu' if v == 'relu' else 'U=' + v:<6} acc {r['acc']:.4f}{extra}  "
                  f"({r['seconds']:.0f}s)", flush=True)
    relu = [r["acc"] for r in results.get("relu", [])]
    print(f"\n{'variant':<8}{'active':>8}{'test acc' if args.split == 'test' else 'val acc':>20}{'gap (pts)':>11}"
          f"   per layer: active fraction / win entropy (mean over seeds)")
    for v, runs in results.items():
        accs = [r["acc"] for r in runs]
        gap = f"{100 * (statistics.mean(accs) - statistics.mean(relu)):+.2f}" if relu and v != "relu" else ""
        active = "0.5*" if v == "relu" else f"{1 / int(v):.3f}"
        layers = ""
        if runs[0]["active"]:
            layers = "  ".join(f"{k} {statistics.mean(r['active'][k] for r in runs):.3f}/"
                               f"{statistics.mean(r['win_entropy'][k] for r in runs):.2f}" for k in runs[0]["active"])
        extra = "".join(f" {k} {_ms([r[k] for r in runs])}" for k in runs[0] if k.startswith("acc_"))
        print(f"{'relu' if v == 'relu' else 'U=' + v:<8}{active:>8}{_ms(accs):>20}{gap:>11}   {layers}{extra}")
    if relu:
        print("(*ReLU: about half the units are non-zero; not measured)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot, f"Fashion-MNIST, cnn48 {'-'.join(map(str, WIDTHS))}, {args.epochs} epochs, "
                                 f"seeds {args.seeds} (mean +- std)")


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the OS after every large tensor.

    Without it, each activation-sized tensor is an mmap/munmap pair and page faults: measured here, a third of
    an LWTA run's time was system time (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ do the same).
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
            libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


if __name__ == "__main__":
    _keep_freed_memory()
    main()
