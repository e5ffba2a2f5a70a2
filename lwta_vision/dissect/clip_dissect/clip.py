"""CLIP-Dissect's scorer: cosine similarity of CLIP image embeddings of the probe images with CLIP text
embeddings of the raw concept words (no prompt template), both L2-normalised. Its jobs live apart: the
weights (:mod:`.weights`), the encoding and its cache (:mod:`.encoding`); this class ties them together."""
from __future__ import annotations

import difflib
import functools
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.cache import TensorCache
from lwta_vision.dissect.clip_dissect.encoding import PRECISIONS, CLIPEncoder
from lwta_vision.dissect.clip_dissect.image_concept import EmbeddingProduct
from lwta_vision.dissect.clip_dissect.scorers import Scorer, resolve_device
from lwta_vision.dissect.clip_dissect.weights import load_clip


def _keeps_global_rng(init):
    """Run a constructor under a forked CPU RNG: building a model initialises weights randomly before
    loading them, and a scorer built in a training config (the dissection callback's) must not change the
    network that the run then initialises and trains."""
    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return init(*args, **kwargs)

    return wrapper


class CLIPScorer(Scorer):
    """CLIP image-text cosine similarity through open_clip, cached on disk and in memory.

    The weights come from one of three places:

    - a pretrained tag (``pretrained="openai"``), fetched by open_clip from the Hugging Face hub or its
      local cache; failure raises :class:`WeightsUnavailableError` (never a silent random init);
    - a local file (``checkpoint=...``): a state dict, an open_clip training checkpoint (``"state_dict"``
      key, ``module.`` prefix stripped) or a ``.safetensors`` file, loaded into the architecture
      ``model_name``. ``pretrained`` then only *names* the weights: when it is a known tag for
      ``model_name`` its preprocessing (mean/std, interpolation) and QuickGELU setting are used, nothing
      is downloaded. Set ``pretrained=None`` to use the architecture's defaults instead;
    - random init, only with ``pretrained=None, allow_random_weights=True`` (tests).

    Embeddings are cached under ``cache_dir`` keyed by the weights (tag, file sha256, or a hash of the
    random tensors), the preprocessing, the probe set's identity, the concept list and the precision.

    Args:
        model_name: open_clip architecture, e.g. ``"ViT-B-16"`` (see ``open_clip.list_models()``).
        pretrained: open_clip pretrained tag (``open_clip.list_pretrained_tags_by_model(model_name)``), or
            None.
        checkpoint: path to a local weights file for ``model_name``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        batch_size: images per forward pass.
        num_workers: DataLoader workers for decoding/preprocessing probe images.
        cache_dir: embedding cache folder; default ``$LWTA_VISION_CACHE`` or ``~/.cache/lwta_vision``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (autocast; embeddings are returned in fp32).
        allow_random_weights: permit ``pretrained=None`` without a checkpoint (random weights).
        quick_gelu: force QuickGELU on/off; None follows the pretrained tag (OpenAI weights need it).
        image_mean: override the preprocessing mean (e.g. for a checkpoint trained with other statistics).
        image_std: override the preprocessing std.
        use_cache: read and write the on-disk cache (the in-memory memo is always used).
        progress: show a tqdm bar while encoding images.
        hub_cache_dir: where open_clip looks for / downloads pretrained weights; default the Hugging Face
            cache (``HF_HOME``).
    """

    @_keeps_global_rng
    def __init__(
        self,
        model_name: str = "ViT-B-16",
        pretrained: Optional[str] = "openai",
        checkpoint: Optional[str] = None,
        device: str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
        precision: str = "fp32",
        allow_random_weights: bool = False,
        quick_gelu: Optional[bool] = None,
        image_mean: Optional[Tuple[float, float, float]] = None,
        image_std: Optional[Tuple[float, float, float]] = None,
        use_cache: bool = True,
        progress: bool = False,
        hub_cache_dir: Optional[str] = None,
    ):
        import open_clip

        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported; choose one of {sorted(PRECISIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if ":" in model_name and model_name.split(":", 1)[0] in ("hf-hub", "local-dir"):
            raise ValueError(
                f"model_name={model_name!r}: 'hf-hub:'/'local-dir:' schemas are not supported; pass a built-in "
                "architecture name (or register one with open_clip.add_model_config) and checkpoint=/path/to/file")
        model_name = model_name.replace("/", "-")  # open_clip's own normalisation ("ViT-B/16" -> "ViT-B-16")
        from lwta_vision import concept_clip

        if model_name == concept_clip.MODEL_NAME:
            concept_clip.register()  # our JSON architecture, registered with open_clip on first use
        known = open_clip.list_models()
        if model_name not in known:
            close = difflib.get_close_matches(model_name, known, n=8, cutoff=0.5)
            hint = f"did you mean: {', '.join(close)}?" if close else f"{len(known)} are available"
            raise ValueError(f"unknown open_clip model_name {model_name!r}; {hint} (see open_clip.list_models())")

        self.model_name, self.pretrained, self.checkpoint = model_name, pretrained, checkpoint
        self.device = resolve_device(device)
        loaded = load_clip(model_name, pretrained, checkpoint, allow_random_weights, quick_gelu, image_mean, image_std,
                           hub_cache_dir)
        self.quick_gelu = loaded.quick_gelu
        weights = {"model_name": model_name, "quick_gelu": loaded.quick_gelu, **loaded.weights,
                   "open_clip": open_clip.__version__}
        self.encoder = CLIPEncoder(loaded.model.to(self.device).eval().requires_grad_(False), loaded.preprocess,
                                   loaded.tokenizer, weights, self.device, batch_size, num_workers, precision,
                                   TensorCache(cache_dir) if use_cache else None, progress)

    # the encoder's parts, as attributes of the scorer (tests and users read them)
    @property
    def model(self) -> torch.nn.Module:
        return self.encoder.model

    @property
    def preprocess(self):
        return self.encoder.preprocess

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def cache(self) -> Optional[TensorCache]:
        return self.encoder.cache

    @cache.setter
    def cache(self, value: Optional[TensorCache]) -> None:
        self.encoder.cache = value

    # the encoder's settings, readable and settable on the scorer as before the split
    batch_size = property(lambda self: self.encoder.batch_size, lambda self, v: setattr(self.encoder, "batch_size", v))
    num_workers = property(lambda self: self.encoder.num_workers,
                           lambda self, v: setattr(self.encoder, "num_workers", v))
    progress = property(lambda self: self.encoder.progress, lambda self, v: setattr(self.encoder, "progress", v))
    precision = property(lambda self: self.encoder.precision,
                         lambda self, v: setattr(self.encoder, "precision", v))

    @property
    def weights(self) -> dict:
        """What identifies the weights: model name, source (tag, file, random) and the tag or sha256."""
        return self.encoder.weights

    def image_embeddings(self, probe: ProbeSet) -> Tensor:
        """L2-normalised fp32 CLIP image embeddings [N, d] of the probe images (CPU), cached."""
        return self.encoder.image_embeddings(probe)

    def text_embeddings(self, concepts: Sequence[str]) -> Tensor:
        """L2-normalised fp32 CLIP text embeddings [M, d] of the raw concept words (no template), cached."""
        return self.encoder.text_embeddings(concepts)

    def encode_pil(self, images: Sequence[Any]) -> Tensor:
        """L2-normalised fp32 embeddings [n, d] of transient PIL images (crops, generated images); not cached."""
        return self.encoder.encode_pil(images)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised fp32 embeddings [m, d] of transient texts (e.g. DnD candidates); not cached."""
        return self.encoder.encode_text(texts)

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Alias of :meth:`text_embeddings`, so a scorer can serve as the text embedder in evaluation."""
        return self.text_embeddings(texts)

    def image_concept(self, probe: ProbeSet, concepts: Sequence[str]) -> EmbeddingProduct:
        """P as the product of the cached embeddings, never multiplied out: labeling computes the rows and
        columns it needs (N x d and M x d instead of N x M: 1/40 of the memory at 20k words and d=512)."""
        return EmbeddingProduct(self.image_embeddings(probe), self.text_embeddings(concepts))

    def similarity(self, probe: ProbeSet, concepts: Sequence[str]) -> Tensor:
        """P [N, M]: cosine similarity of each probe image with each concept word."""
        return self.image_embeddings(probe) @ self.text_embeddings(concepts).T

    def __repr__(self) -> str:
        src = f"checkpoint={self.checkpoint!r}" if self.checkpoint else f"pretrained={self.pretrained!r}"
        return f"CLIPScorer(model_name={self.model_name!r}, {src}, device={str(self.device)!r})"
