"""soft-WPMI at ImageNet scale: ours (P never built) against CLIP-Dissect's formulation, same inputs, one run.

    python benchmarks/soft_wpmi_scale.py                                   # both sizes below
    python benchmarks/soft_wpmi_scale.py --sizes 10000x512x20000 --threads 2

Inputs, shared by both sides and built from one seed in each process: activations [N, K] and CLIP-like
L2-normalised embeddings, images [N, d] and concept words [M, d] (d = 512). Each image's embedding leans
towards a few concept words, so P has the structure of a CLIP similarity (a few high cosines per image over a
background near 0) rather than pure noise.

- ``reference``: CLIP-Dissect's formulation written from its definition (ALGORITHMS.md, not its code): the
  dense P = images @ words.T, the dense softmax over concepts, each neuron's top-k rows gathered and
  log(1 + w_r (p - 1) + min_prob) summed, in float32 as its code runs; neurons in batches of
  ``--reference-batch`` so that the gather fits in memory at K = 2,048.
- ``ours``: :func:`lwta_vision.dissect.clip_dissect.soft_wpmi` on an
  :class:`~lwta_vision.dissect.clip_dissect.EmbeddingProduct`: only the rows of images in some neuron's top-k
  are computed, a chunk at a time, in float64.

Each side runs in a fresh subprocess; peak RSS is the kernel's VmHWM, reset after the inputs are built, so
"working memory" is the peak beyond the inputs both sides share. Labels are each neuron's argmax; where the
two sides disagree, the script prints how far apart the two concepts are in ours (float64), so a reader sees
whether the float32 reference rounded a near tie. Linux only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

SIDES = ("reference", "ours")
DIM = 512


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def inputs(n: int, k: int, m: int, seed: int, dim: int = DIM):
    """Activations [N, K] and L2-normalised embeddings [N, d], [M, d] with CLIP-like structure."""
    import torch

    g = torch.Generator().manual_seed(seed)
    words = torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=1)
    images = torch.randn(n, dim, generator=g)
    for lo in range(0, n, 8192):  # each image leans towards 3 words (cosine ~0.3 with them)
        hi = min(n, lo + 8192)
        picks = torch.randint(0, m, (hi - lo, 3), generator=g)
        images[lo:hi] = torch.nn.functional.normalize(images[lo:hi], dim=1) + 0.35 * words[picks].sum(1)
    images = torch.nn.functional.normalize(images, dim=1)
    activations = torch.randn(n, k, generator=g)
    return activations, images, words


def reference_soft_wpmi(activations, images, words, top_k=100, a=10.0, lam=1.0, p_start=0.998, p_end=0.97,
                        min_prob=1e-7, batch=128):
    """CLIP-Dissect's soft-WPMI from its definition, dense and in float32 (scores [K, M])."""
    import torch

    p = images @ words.T  # [N, M]
    probs = torch.softmax(a * p, dim=1)
    del p
    k = min(top_k, activations.shape[0])
    top = torch.topk(activations, k, dim=0).indices  # [k, K]
    w = p_start - torch.arange(k, dtype=torch.float32) / k * (p_start - p_end)
    log_p = torch.empty(activations.shape[1], words.shape[0])
    for lo in range(0, activations.shape[1], batch):
        gathered = probs[top[:, lo:lo + batch].T]  # [B, k, M]
        log_p[lo:lo + batch] = torch.log(1 + w[None, :, None] * (gathered - 1) + min_prob).sum(1)
        del gathered
    log_prior = torch.logsumexp(log_p, dim=0, keepdim=True) - math.log(log_p.shape[0])
    return log_p - lam * log_prior


def _worker(args) -> None:
    import torch

    from lwta_vision.dissect.clip_dissect import EmbeddingProduct, soft_wpmi

    torch.set_num_threads(args.threads)
    activations, images, words = inputs(args.n, args.k, args.m, args.seed)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS, the inputs included
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if args.worker == "reference":
        scores = reference_soft_wpmi(activations, images, words, batch=args.reference_batch)
    else:
        scores = soft_wpmi(activations, EmbeddingProduct(images, words), chunk_size=args.chunk_size)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    top = scores.double().topk(5, dim=1)
    out = {"side": args.worker, "seconds": seconds, "before_kib": before, "peak_kib": peak,
           "labels": top.indices[:, 0].tolist()}
    if args.worker == "ours":  # its best 5 in float64, to tell a near tie from a real disagreement
        out["top5"] = [top.indices.tolist(), top.values.tolist()]
    print(json.dumps(out))


def _run(side: str, n: int, k: int, m: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={side}", f"--n={n}", f"--k={k}", f"--m={m}",
           f"--threads={args.threads}", f"--seed={args.seed}", f"--reference-batch={args.reference_batch}"]
    if args.chunk_size is not None:
        cmd.append(f"--chunk-size={args.chunk_size}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} at N={n} K={k} M={m} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10000x512x20000", "50000x2048x20000"],
                        help="NxKxM: probe images x neurons x concepts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="ours: softmax rows held at once (default: the library's, a block that fits in cache)")
    parser.add_argument("--reference-batch", type=int, default=128, help="reference: neurons gathered at once")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    print(f"soft-WPMI, CPU, {args.threads} threads, d={DIM}, top_k=100; reference: dense float32 (neuron batches of "
          f"{args.reference_batch}); ours: lazy rows, float64, chunk {args.chunk_size or 'default'}")
    print(f"{'N x K x M':<22}{'side':<11}{'time':>9}{'peak RSS':>12}{'working':>11}  labels")
    for size in args.sizes:
        n, k, m = (int(v) for v in size.split("x"))
        res = {side: _run(side, n, k, m, args) for side in SIDES}
        ref, ours = res["reference"], res["ours"]
        diff = [u for u, (a, b) in enumerate(zip(ref["labels"], ours["labels"])) if a != b]
        for side in SIDES:
            r = res[side]
            work = (r["peak_kib"] - r["before_kib"]) / 1024
            print(f"{size:<22}{side:<11}{r['seconds']:>8.1f}s{r['peak_kib'] / 1024:>8,.0f} MiB{work:>7,.0f} MiB")
        w_ref = ref["peak_kib"] - ref["before_kib"]
        w_ours = ours["peak_kib"] - ours["before_kib"]
        print(f"  ours vs reference: x{ref['seconds'] / ours['seconds']:.2f} faster, working memory "
              f"{w_ours / w_ref:.3f} (1/{w_ref / max(w_ours, 1):.0f}); labels identical for "
              f"{k - len(diff)}/{k} neurons")
        if diff:
            idx, val = ours["top5"]
            gaps = [val[u][0] - val[u][idx[u].index(ref["labels"][u])] if ref["labels"][u] in idx[u] else math.inf
                    for u in diff]
            print(f"  where they differ, ours' float64 score of its label minus that of the reference's label: "
                  f"{', '.join(f'{g:.1e}' for g in sorted(gaps)[:8])} nats (inf: not in ours' top 5)")


if __name__ == "__main__":
    main()
