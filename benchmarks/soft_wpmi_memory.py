"""Peak memory of chunked soft-WPMI vs the direct formula, side by side, same inputs, same labels.

    python benchmarks/soft_wpmi_memory.py                       # N=50,000 images, M=5,000 concepts, K=512
    python benchmarks/soft_wpmi_memory.py --images 20000 --concepts 20000 --neurons 256

Each variant runs in a fresh subprocess (torch's CPU allocation is invisible to tracemalloc). The worker
builds the inputs from a fixed seed, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs
the function once and reports VmHWM. "raw" is the process's peak resident memory (Python + torch + the
inputs + the work); "net" subtracts the resident memory just before the call, i.e. it counts only what
the scoring itself needed, with the inputs as the shared baseline. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("soft_wpmi", "soft_wpmi_reference")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(args: argparse.Namespace) -> None:
    import torch

    from lwta_vision.dissect.clip_dissect import similarity

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    activations = torch.randn(args.images, args.neurons, generator=g)
    sims = torch.empty(args.images, args.concepts)
    for start in range(0, args.images, 4096):  # fill in blocks: no full-size temporaries
        block = sims[start : start + 4096]
        block.normal_(0.2, 0.05, generator=g)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn = getattr(similarity, args.worker)
    kwargs = dict(top_k=args.top_k)
    if args.worker == "soft_wpmi":
        kwargs["chunk_size"] = args.chunk_size
    t0 = time.perf_counter()
    scores = fn(activations, sims, **kwargs)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "variant": args.worker,
                "before_kib": before,
                "peak_kib": peak,
                "seconds": seconds,
                "labels": scores.argmax(dim=1).tolist(),
                "scores_sample": scores[:4, :4].flatten().tolist(),
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="N probe images")
    parser.add_argument("--concepts", type=int, default=5_000, help="M concepts")
    parser.add_argument("--neurons", type=int, default=512, help="K neurons")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return

    passthrough = [
        f"--images={args.images}", f"--concepts={args.concepts}", f"--neurons={args.neurons}",
        f"--top-k={args.top_k}", f"--chunk-size={args.chunk_size}", f"--threads={args.threads}",
        f"--seed={args.seed}",
    ]  # fmt: skip
    results = {}
    for variant in VARIANTS:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--worker={variant}", *passthrough],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])

    input_mib = (args.images * args.concepts + args.images * args.neurons) * 4 / 2**20
    print(
        f"soft-WPMI peak memory, CPU, float64 compute: N={args.images:,} images, M={args.concepts:,} concepts, "
        f"K={args.neurons} neurons, top_k={args.top_k}, chunk_size={args.chunk_size}, threads={args.threads}"
    )
    print(f"inputs (float32 activations + image-concept similarities): {input_mib:,.0f} MiB")
    print(f"{'variant':<22}{'raw peak RSS':>14}{'net (peak - before)':>22}{'time':>9}")
    for variant, r in results.items():
        raw = r["peak_kib"] / 1024
        net = (r["peak_kib"] - r["before_kib"]) / 1024
        print(f"{variant:<22}{raw:>10,.0f} MiB{net:>18,.0f} MiB{r['seconds']:>8.1f}s")
    fast, ref = results["soft_wpmi"], results["soft_wpmi_reference"]
    net_fast = fast["peak_kib"] - fast["before_kib"]
    net_ref = ref["peak_kib"] - ref["before_kib"]
    same = fast["labels"] == ref["labels"]
    max_diff = max(abs(a - b) for a, b in zip(fast["scores_sample"], ref["scores_sample"]))
    print(
        f"ratio soft_wpmi / reference: net {net_fast / net_ref:.3f} (1/{net_ref / net_fast:.1f}), "
        f"raw {fast['peak_kib'] / ref['peak_kib']:.3f}; speed x{ref['seconds'] / fast['seconds']:.2f}"
    )
    print(f"labels identical for all {args.neurons} neurons: {same}; max |score diff| on a 4x4 sample: {max_diff:.2e}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
