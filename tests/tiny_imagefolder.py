"""A tiny ImageNet-style ImageFolder for tests: real wnid folder names, a few small PNG and JPEG files each."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# tench, goldfish, toilet paper: the first two and the last of the 1000 sorted wnids
WNIDS = ("n01440764", "n01443537", "n15075141")
NAMES = ("tench", "goldfish", "toilet paper")


def make_image_folder(root, classes: Sequence[str] = WNIDS, per_split=(("train", 4), ("val", 2)),
                      seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.png|JPEG``: 40x48 RGB noise images (PNG and JPEG alternate)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in per_split:
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / (f"{i}.JPEG" if i % 2 else f"{i}.png"))
    return root


def folder_items(split_dir) -> list[tuple[bytes, int]]:
    """``(file bytes, class index)`` of every image of an ImageFolder split, classes in sorted order."""
    classes = sorted(p.name for p in Path(split_dir).iterdir() if p.is_dir())
    return [(f.read_bytes(), label) for label, c in enumerate(classes)
            for f in sorted((Path(split_dir) / c).iterdir())]
