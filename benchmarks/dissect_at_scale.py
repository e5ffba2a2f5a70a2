"""The whole dissection at scale, profiled: 5 layers of a ResNet-50, an ImageNet-layout probe folder, CLIP.

    python benchmarks/dissect_at_scale.py                          # 10,000 images of 64 px, 20k words, CPU
    python benchmarks/dissect_at_scale.py --images 50000 --image-size 224 --device cuda --clip-precision bf16

What the epoch-end callback (and ``dissect.py describe``) does once CLIP's embeddings are cached, timed step by
step: record the 5 layers (one forward pass with hooks, pooling, running top-k), then label each layer with
soft-WPMI computed from the embeddings (P is never built). It is set against one plain eval forward pass over
the same probe loader. CLIP encoding is timed apart, cold and from the cache. Goal: dissection <= 1.1x the
forward pass.

Random weights, announced, as this measures time and not labels: a torchvision ResNet-50 (seeded) and a small
CLIP registered here from JSON with CLIP's embedding width (``--clip-dim``, 512 as ViT-B; the width sets the
cost of P's rows) and one-layer towers, so the encoder is cheap and the labeling costs what it would with a
real CLIP. The probe folder is generated once under ``--folder`` (one JPEG per image, 100 class folders). The
same run from the command line, with real weights, is

    python dissect.py describe --torchvision_model resnet50 --image_folder FOLDER --scorer clip \\
        --layers '[layer1, layer2, layer3, layer4, fc]' --concepts 20k --html false
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LAYERS = ["layer1", "layer2", "layer3", "layer4", "fc"]
BENCH_CLIP = "lwta-bench-clip"


def register_bench_clip(dim: int) -> str:
    """A CLIP of embedding width ``dim`` with one-layer towers, registered with open_clip (random weights)."""
    import open_clip

    name = f"{BENCH_CLIP}-{dim}"
    if name not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="lwta-bench-clip-"))
        (folder / f"{name}.json").write_text(json.dumps({
            "embed_dim": dim,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
        }))
        open_clip.add_model_config(str(folder))
    return name


def make_folder(root: Path, n: int, size: int, seed: int = 0, classes: int = 100) -> Path:
    """n smooth random JPEGs in ImageNet's layout (``root/<wnid-like>/<i>.JPEG``), once."""
    marker = root / f".complete-{n}-{size}-{seed}"
    if marker.is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
    for i in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        img.save(root / f"n{i % classes:08d}" / f"{i:06d}.JPEG", quality=90)
    marker.touch()
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--concepts", default="20k")
    ap.add_argument("--layers", nargs="+", default=LAYERS)
    ap.add_argument("--folder", default=None, help="probe folder (generated if incomplete); default under /tmp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--clip-precision", default="fp32")
    ap.add_argument("--clip-dim", type=int, default=512, help="CLIP embedding width (ViT-B: 512)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchvision
    from torchvision import transforms as T

    from lwta_vision.datasets.probe import ImageFolderImages, ProbeSet
    from lwta_vision.dissect.clip_dissect import CLIPScorer
    from lwta_vision.dissect.clip_dissect.labeling import label_layer
    from lwta_vision.dissect.concepts import load_concept_set
    from lwta_vision.dissect.pipeline import probe_loader
    from lwta_vision.dissect.recording import eval_mode, record_activations

    device = torch.device(args.device)
    folder = Path(args.folder or Path(tempfile.gettempdir()) / "lwta-scale-probe")
    t0 = time.perf_counter()
    make_folder(folder, args.images, args.image_size)
    print(f"probe folder {folder}: {args.images} images of {args.image_size} px ({time.perf_counter() - t0:.0f}s)")
    transform = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    probe = ProbeSet(ImageFolderImages(str(folder)), transform, f"folder:{folder}")
    print(f"random weights: resnet50 and a {args.clip_dim}-d CLIP are built untrained (torch seed 0) to time the "
          "dissection; their labels mean nothing")
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval().to(device)
    concepts = load_concept_set(args.concepts)
    figures = {"images": len(probe), "image_size": args.image_size, "concepts": len(concepts), "layers": args.layers,
               "clip_dim": args.clip_dim, "device": str(device), "threads": torch.get_num_threads()}

    cache = tempfile.mkdtemp(prefix="lwta-scale-cache-")
    try:
        clip_name = register_bench_clip(args.clip_dim)

        def scorer():
            torch.manual_seed(0)  # the same random CLIP both times: the second one hits the cache
            return CLIPScorer(model_name=clip_name, pretrained=None, allow_random_weights=True, device=str(device),
                              cache_dir=cache, batch_size=256, num_workers=args.num_workers,
                              precision=args.clip_precision)

        t0 = time.perf_counter()
        p = scorer().image_concept(probe, concepts)
        figures["clip_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = scorer().image_concept(probe, concepts)  # a new scorer: the disk cache, as the next run sees it
        figures["clip_cached_s"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    loader = probe_loader(probe, args.batch_size, args.num_workers)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward() -> float:
        t = time.perf_counter()
        with torch.no_grad(), eval_mode(net):
            for x, _ in loader:
                net(x.to(device, non_blocking=True))
        sync()
        return time.perf_counter() - t

    forward()  # warm-up: the data path and the kernels
    figures["forward_s"] = forward()
    t = time.perf_counter()
    records = record_activations(net, args.layers, loader, top_k=100, device=device)
    sync()
    figures["record_s"] = time.perf_counter() - t
    figures["label_s"] = {}
    for name, rec in records.items():
        t = time.perf_counter()
        label_layer(rec, p, concepts, device=device)
        figures["label_s"][name] = time.perf_counter() - t
    label_total = sum(figures["label_s"].values())
    dissection = figures["record_s"] + label_total
    figures["dissection_s"] = dissection
    figures["ratio"] = dissection / figures["forward_s"]

    print(f"CLIP, {len(probe)} images + {len(concepts)} words: {figures['clip_cold_s']:.1f}s cold, "
          f"{figures['clip_cached_s']:.2f}s from the cache")
    print(f"eval forward over the probe set: {figures['forward_s']:.1f}s")
    units = {n: r.num_units for n, r in records.items()}
    print(f"dissection after the cache: {dissection:.1f}s = record {figures['record_s']:.1f}s + label "
          f"{label_total:.1f}s ({', '.join(f'{n} [{units[n]}] {s:.1f}s' for n, s in figures['label_s'].items())})")
    print(f"ratio dissection / forward: {figures['ratio']:.2f} (goal <= 1.1)")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
