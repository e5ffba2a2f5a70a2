"""Train the concept CLIP: ``python -m lwta_vision.concept_clip --out DIR`` (minutes on 2 CPU cores).

Locked-image tuning (LiT, Zhai et al. 2022), in two stages:

1. The image tower learns the annotations: a linear head on its embedding is trained on the class (the
   largest shape, cross-entropy) and on every atom the image shows (shapes, colours, textures, coloured
   objects; binary cross-entropy). Measured: trained contrastively from scratch, shape words stayed far
   below colour and texture words in this budget.
2. The image tower is locked and the text tower learns to match it with a sigmoid loss over every
   (image, caption) pair of a batch plus the 18 concept words, the target being whether the caption is
   true of the image (:func:`lwta_vision.concept_clip.captions.describes`).

Images come from the ``"clip"`` stream of the generated data, half rendered at 32 px and half at 64 px
(resized by the model's own preprocessing), so the model serves the 32 px quickstart and 64 px probes
alike and has never seen an image of a network's train/val/test split. Zero-shot accuracy is measured on
held-out images of another seed, after the fp16 rounding the shipped file has.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lwta_vision.concept_clip import MODEL_NAME, PROVENANCE_FILE, WEIGHTS_FILE, register
from lwta_vision.concept_clip.captions import (CONCEPT_WORDS, NC, NS, NT, NUM_ATOMS, caption, describes,
                                               scene_facts, word_requirements)
from lwta_vision.datasets.shapes import _PALETTE, ShapesConceptDataset
from lwta_vision.dissect.cache import hash_file

ATTRIBUTES = {"shape": (0, NS), "colour": (NS, NS + NC), "texture": (NS + NC, NS + NC + NT)}
EVAL_SEED_OFFSET = 1_000_003  # held-out images: another seed of the same stream


def build_images(n: int, seed: int, image_sizes: Sequence[int], preprocess: Callable):
    """Images of the "clip" stream through ``preprocess``; returns (x [n,3,H,W], atoms [n, A], facts, labels).

    Image i is rendered at ``image_sizes[i % len(image_sizes)]``; each size has its own dataset seed offset,
    so the two sizes never show the same scene.
    """
    xs, atoms, facts, labels = [], np.zeros((n, NUM_ATOMS), dtype=np.float32), [], np.zeros(n, dtype=np.int64)
    datasets = [ShapesConceptDataset(n, size, seed=seed * 10 + k, split="clip") for k, size in enumerate(image_sizes)]
    for i in range(n):
        ds = datasets[i % len(datasets)]
        scene = ds._scene(i // len(datasets))
        f = scene_facts(scene)
        facts.append(f)
        atoms[i] = f.atoms()
        labels[i] = scene["label"]
        xs.append(preprocess(Image.fromarray(_PALETTE[scene["colours"]])))
    return torch.stack(xs), torch.from_numpy(atoms), facts, torch.from_numpy(labels)


@torch.no_grad()
def encode_images(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([F.normalize(model.encode_image(x[i:i + batch]), dim=-1) for i in range(0, len(x), batch)])


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, x: torch.Tensor, atoms: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per attribute, the share of images whose best-matching word of that attribute is in the image.

    ``class`` is stricter: the best shape word is the image's largest shape.
    """
    model.eval()
    words = F.normalize(model.encode_text(tokenizer(list(CONCEPT_WORDS))), dim=-1)
    sim = encode_images(model, x) @ words.T
    rows = torch.arange(len(x))
    out = {}
    for name, (lo, hi) in ATTRIBUTES.items():
        out[name] = float(atoms[rows, sim[:, lo:hi].argmax(1) + lo].mean())
    out["class"] = float((sim[:, :NS].argmax(1) == labels).float().mean())
    return out


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree turns: every concept of the generated data is invariant to them."""
    flip_h, flip_v, turn = (torch.rand(3, generator=gen) < 0.5).tolist()
    if flip_h:
        x = x.flip(3)
    if flip_v:
        x = x.flip(2)
    if turn:
        x = x.transpose(2, 3)
    return x


def train(
    out_dir: os.PathLike,
    seed: int = 0,
    num_images: int = 20000,
    image_sizes: Sequence[int] = (32, 64),
    image_epochs: int = 12,
    text_epochs: int = 20,
    batch_size: int = 256,
    image_lr: float = 3e-3,
    text_lr: float = 2e-3,
    num_eval: int = 2000,
    threads: Optional[int] = None,
    log: Callable[[str], None] = print,
    command: Optional[str] = None,
) -> dict:
    """Train, measure zero-shot accuracy and write ``WEIGHTS_FILE`` (fp16 safetensors) and ``PROVENANCE_FILE``.

    Returns the provenance record (also written to ``out_dir``).
    """
    import open_clip
    from safetensors.torch import save

    from lwta_vision.dissect.report import atomic_write_bytes, atomic_write_text

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(seed)
    name = register()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    x, atoms, facts, labels = build_images(num_images, seed, image_sizes, preprocess)
    ex, eatoms, _, elabels = build_images(num_eval, seed + EVAL_SEED_OFFSET, image_sizes, preprocess)
    log(f"rendered {num_images} training and {num_eval} held-out images in {time.time() - t0:.0f} s")
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, num_images // batch_size)

    # stage 1: the image tower learns the annotations through a linear head (discarded afterwards)
    embed_dim = model.text_projection.shape[1]
    head = torch.nn.Linear(embed_dim, NS + NUM_ATOMS)
    params = list(model.visual.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=image_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=image_lr, total_steps=image_epochs * steps_per_epoch,
                                                pct_start=0.15)
    for epoch in range(image_epochs):
        model.visual.train()
        perm = torch.randperm(num_images, generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            logits = head(model.encode_image(_augment(x[idx], gen)))
            loss = F.cross_entropy(logits[:, :NS], labels[idx]) + \
                NUM_ATOMS * F.binary_cross_entropy_with_logits(logits[:, NS:], atoms[idx]) / 10
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"image epoch {epoch + 1}/{image_epochs}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")

    # stage 2: lock the image tower; the text tower learns to describe it
    model.lock_image_tower()  # its embeddings are computed once below; only the text tower trains
    feats = encode_images(model, x)
    flipped = encode_images(model, x.flip(3))  # a second view of every image, at no training cost
    words = tokenizer(list(CONCEPT_WORDS))
    word_req = torch.from_numpy(word_requirements())
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    bias = torch.nn.Parameter(torch.tensor(-5.0))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    opt = torch.optim.AdamW(text_params + [bias], lr=text_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=text_lr, total_steps=text_epochs * steps_per_epoch,
                                                pct_start=0.1)
    rng = np.random.default_rng(seed)
    token_cache: dict[str, torch.Tensor] = {}  # captions repeat a lot; BPE-encode each string once

    def tokenize(texts):
        for t in texts:
            if t not in token_cache:
                token_cache[t] = tokenizer([t])[0]
        return torch.stack([token_cache[t] for t in texts])

    model.train()
    for epoch in range(text_epochs):
        perm = torch.randperm(num_images, generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            caps, reqs = zip(*(caption(rng, facts[i]) for i in idx.tolist()))
            tokens = torch.cat([tokenize(caps), words])
            req = torch.cat([torch.from_numpy(np.stack(reqs)), word_req])
            img = (flipped if b % 2 else feats)[idx]
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T + bias
            target = torch.from_numpy(describes(req.numpy(), atoms[idx].numpy())).float()
            loss = F.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        if (epoch + 1) % 10 == 0 or epoch + 1 == text_epochs:
            log(f"text epoch {epoch + 1}/{text_epochs}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")

    # ship in fp16 and measure what ships
    state = {k: v.detach().half().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS_FILE, save(state))
    shipped, _, shipped_pp = open_clip.create_model_and_transforms(name, pretrained=str(out_dir / WEIGHTS_FILE))
    acc = zero_shot_accuracy(shipped, tokenizer, ex, eatoms, elabels)
    record = {
        "model_name": MODEL_NAME,
        "weights": WEIGHTS_FILE,
        "sha256": hash_file(out_dir / WEIGHTS_FILE),
        "bytes": (out_dir / WEIGHTS_FILE).stat().st_size,
        "zero_shot": acc,
        "held_out": {"images": num_eval, "seed": seed + EVAL_SEED_OFFSET, "image_sizes": list(image_sizes),
                     "split": "clip"},
        "train": {"seed": seed, "images": num_images, "image_sizes": list(image_sizes), "split": "clip",
                  "image_epochs": image_epochs, "text_epochs": text_epochs, "batch_size": batch_size,
                  "image_lr": image_lr, "text_lr": text_lr, "seconds": round(time.time() - t0, 1),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "open_clip": open_clip.__version__},
        "command": command or "",
    }
    atomic_write_text(out_dir / PROVENANCE_FILE, json.dumps(record, indent=1))
    log(f"zero-shot on {num_eval} held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    log(f"wrote {out_dir / WEIGHTS_FILE} ({record['bytes'] / 1e6:.1f} MB) and {out_dir / PROVENANCE_FILE} "
        f"in {record['train']['seconds']:.0f} s")
    return record


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m lwta_vision.concept_clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the weights file and PROVENANCE.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images", type=int, default=20000)
    p.add_argument("--image_epochs", type=int, default=12)
    p.add_argument("--text_epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--num_eval", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    for flag in ("num_images", "image_epochs", "text_epochs", "batch_size", "num_eval"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    argv = sys.argv[1:] if argv is None else list(argv)
    return train(a.out, seed=a.seed, num_images=a.num_images, image_epochs=a.image_epochs,
                 text_epochs=a.text_epochs, batch_size=a.batch_size, num_eval=a.num_eval, threads=a.threads,
                 command="python -m lwta_vision.concept_clip " + " ".join(argv))
