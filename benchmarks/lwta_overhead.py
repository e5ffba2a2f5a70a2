"""Training-step time of ResNet-18 (CIFAR stem) with LWTA versus the same network with ReLU.

    python benchmarks/lwta_overhead.py [--batch-size 128] [--steps 5] [--device cpu]

Variants are timed in interleaved rounds (ReLU, U=2, U=16, ReLU, ...) so machine drift hits all of them
alike; the median step time per variant and its ratio to ReLU are printed. Target: ratio <= 1.10.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lwta_vision.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 1 warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--competitors", type=int, nargs="+", default=[2, 16])
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    variants = {"relu": {"act": "relu"}}
    for u in args.competitors:
        variants[f"lwta U={u}"] = {"act": "lwta", "act_kwargs": {"competitors": u, "temperature": 1.67}}
    models = {k: create_model("resnet18", stem="cifar", num_classes=10, **v).to(dev) for k, v in variants.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}
    x = torch.randn(args.batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)

    def step(name: str) -> float:
        m, opt = models[name], opts[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times = {k: [] for k in models}
    for k in models:
        step(k)  # warm-up
    for _ in range(args.steps):
        for k in models:
            times[k].append(step(k))
    base = statistics.median(times["relu"])
    print(f"ResNet-18 (CIFAR stem), batch {args.batch_size}, 32x32, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps/variant")
    print(f"{'variant':<14}{'median step (s)':>16}{'ratio vs relu':>15}")
    for k, t in times.items():
        med = statistics.median(t)
        print(f"{k:<14}{med:>16.3f}{med / base:>15.3f}")


if __name__ == "__main__":
    main()
