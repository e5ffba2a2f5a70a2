"""A tiny random-weight CLIP for tests: registered with open_clip from JSON, built with pretrained=None.

~1.6M parameters (most in the 49408-token embedding, which must match open_clip's default tokenizer);
builds in milliseconds and encodes 32x32 images on a CPU with no network.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import numpy as np

TINY_CLIP = "lwta-test-tiny-vit"

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

_config_dir: Optional[str] = None


def register_tiny_clip() -> str:
    """Register the tiny architecture with open_clip (once per process) and return its model name.

    The JSON lives in a per-process temp folder that is never deleted while the process runs, because
    open_clip rescans every registered folder whenever another config is added.
    """
    global _config_dir
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        if _config_dir is None:
            _config_dir = tempfile.mkdtemp(prefix="lwta-tiny-clip-")
            with open(os.path.join(_config_dir, f"{TINY_CLIP}.json"), "w") as f:
                json.dump(TINY_CLIP_CONFIG, f)
        open_clip.add_model_config(_config_dir)
    return TINY_CLIP


def random_images(n: int, size: int = 32, seed: int = 0):
    """A list dataset of ``(uint8[size, size, 3], label)`` items with random pixels."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), i % 10) for i in range(n)]


def random_probe(n: int = 10, size: int = 32, seed: int = 0, name: str = "random"):
    """A ProbeSet over :func:`random_images` with an identity transform for the target network."""
    from lwta_vision.datasets.probe import ProbeSet

    return ProbeSet(random_images(n, size, seed), transform=lambda img: img, name=name)
