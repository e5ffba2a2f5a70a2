"""CLIP embeddings of probe images and concept words: batched, under autocast, cached on disk and in memory.

Embeddings, not the image-concept matrix, are what is cached and returned: the matrix is N x M (50k images x
20k words is 4 GB in float32), the embeddings N x d and M x d, and labeling needs only some of the matrix.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.cache import TensorCache, cache_key, hash_strings

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class CLIPEncoder:
    """Encodes with one open_clip model; every embedding is L2-normalised float32 on the CPU.

    Cached entries are keyed by ``weights`` (what identifies the model's weights), the preprocessing, the
    probe set's identity or the concept list, and the precision.
    """

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, weights: Dict[str, Any],
                 device: torch.device, batch_size: int = 64, num_workers: int = 0, precision: str = "fp32",
                 cache: Optional[TensorCache] = None, progress: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported; choose one of {sorted(PRECISIONS)}")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.weights, self.device = weights, device
        self.batch_size, self.num_workers, self.precision = batch_size, num_workers, precision
        self.cache, self.progress = cache, progress
        self._memo: Dict[str, Tensor] = {}

    def _cached(self, parts: Dict[str, Any], compute) -> Tensor:
        key = cache_key(**parts)
        if key in self._memo:
            return self._memo[key]
        hit = self.cache.load(key, parts) if self.cache is not None else None
        if hit is not None and "embeddings" in hit:
            emb = hit["embeddings"].float()
        else:
            emb = compute()
            if self.cache is not None:
                self.cache.save(key, {"embeddings": emb}, parts)
        self._memo[key] = emb
        return emb

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def _encode_images(self, probe: ProbeSet, progress: Optional[bool] = None) -> Tensor:
        from torch.utils.data import DataLoader

        loader = DataLoader(probe.with_transform(self.preprocess), batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        if self.progress if progress is None else progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc=f"CLIP images ({probe.name})", unit="batch")
        out: Optional[Tensor] = None
        for images, idx in loader:
            with self._autocast():
                emb = self.model.encode_image(images.to(self.device, non_blocking=True))
            emb = torch.nn.functional.normalize(emb.float(), dim=-1).cpu()
            if out is None:
                out = torch.empty(len(probe), emb.shape[1])
            out[idx] = emb
        if out is None:
            raise ValueError(f"probe set {probe.name!r} is empty")
        return out

    @torch.no_grad()
    def _encode_texts(self, concepts: List[str]) -> Tensor:
        chunks, step = [], max(self.batch_size, 256)  # text is cheap: larger batches
        for i in range(0, len(concepts), step):
            tokens = self.tokenizer(concepts[i:i + step]).to(self.device)
            with self._autocast():
                emb = self.model.encode_text(tokens)
            chunks.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def image_embeddings(self, probe: ProbeSet) -> Tensor:
        """L2-normalised fp32 CLIP image embeddings [N, d] of the probe images (CPU), cached."""
        parts = {"kind": "clip-image", "weights": self.weights, "preprocess": str(self.preprocess),
                 "probe": probe.identity, "n": len(probe), "precision": self.precision}
        return self._cached(parts, lambda: self._encode_images(probe))

    def text_embeddings(self, concepts: Sequence[str]) -> Tensor:
        """L2-normalised fp32 CLIP text embeddings [M, d] of the raw concept words (no template), cached."""
        concepts = [str(c) for c in concepts]
        if not concepts:
            raise ValueError("the concept list is empty")
        parts = {"kind": "clip-text", "weights": self.weights, "concepts": hash_strings(concepts),
                 "m": len(concepts), "precision": self.precision}
        return self._cached(parts, lambda: self._encode_texts(concepts))

    @torch.no_grad()
    def encode_pil(self, images: Sequence[Any]) -> Tensor:
        """L2-normalised fp32 embeddings [n, d] of transient PIL images (crops, generated images); not cached."""
        if not images:
            return torch.empty(0)
        return self._encode_images(ProbeSet(list(images), transform=None, name="transient"), progress=False)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised fp32 embeddings [m, d] of transient texts (e.g. DnD candidates); not cached."""
        return self._encode_texts([str(t) for t in texts])
