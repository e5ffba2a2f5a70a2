"""CLIP image-encoding throughput (images/s) per precision: the cost of the first epoch's image-concept matrix.

    python benchmarks/clip_throughput.py --device cuda --model ViT-B-16 --images 4096     # in gpu_suite.sh
    python benchmarks/clip_throughput.py --model ViT-B-32 --images 256 --batch-size 32   # a CPU try

Random weights, announced (throughput does not depend on them; nothing is downloaded): open_clip builds the
architecture from its JSON. Images are random tensors at the model's input size, already on the device, so this
is the encoder alone (decoding and resizing are the DataLoader's, measured in dissect_at_scale.py). Precisions:
fp32, bf16 autocast and (CUDA) fp16 autocast, the choices of ``--clip_precision``; timed in interleaved rounds
after a warm-up batch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16", help="an open_clip architecture name")
    ap.add_argument("--images", type=int, default=4096, help="images per precision and round")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()
    import open_clip

    dev = torch.device(args.device)
    print(f"note: {args.model} with random weights (timing only; no download)")
    model = open_clip.create_model(args.model, pretrained=None).to(dev).eval()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    x = torch.randn(args.batch_size, 3, size, size, device=dev)
    precisions = {"fp32": None, "bf16": torch.bfloat16}
    if dev.type == "cuda":
        precisions["fp16"] = torch.float16
    batches = max(1, args.images // args.batch_size)

    def run(dtype) -> float:
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(batches):
                model.encode_image(x)
        sync()
        return batches * args.batch_size / (time.perf_counter() - t0)

    rates: dict[str, list[float]] = {k: [] for k in precisions}
    for k, dt in precisions.items():
        with torch.no_grad(), torch.autocast(dev.type, dtype=dt or torch.float32, enabled=dt is not None):
            model.encode_image(x)  # warm-up
    for _ in range(args.rounds):
        for k, dt in precisions.items():
            rates[k].append(run(dt))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.model} image encoder, {size}px, batch {args.batch_size}, {batches * args.batch_size} images x "
          f"{args.rounds} rounds, {args.device}, torch {torch.__version__}")
    for k, r in med.items():
        print(f"{k:<6}{r:>12.0f} images/s{r / med['fp32']:>8.2f}x fp32")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "device": args.device, "images_per_s": med,
                                              "rounds": rates}, indent=1))


if __name__ == "__main__":
    main()
