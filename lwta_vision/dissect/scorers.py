"""Concept scorers: the matrix P [N probe images, M concepts] that CLIP-Dissect compares activations with.

- :class:`CLIPScorer`: cosine similarity between CLIP image embeddings of the probe images and CLIP text
  embeddings of the raw concept words (no prompt template), both L2-normalised; cached on disk by a hash
  of the weights, the preprocessing, the probe set and the concept list.
- :class:`GroundTruthScorer`: the dataset's own binary concept annotations, for datasets that have them.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
from abc import ABC, abstractmethod
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .cache import TensorCache, cache_key, hash_file, hash_state_dict, hash_strings
from .probe import ProbeSet, _FirstN

__all__ = ["Scorer", "CLIPScorer", "GroundTruthScorer", "UnknownConceptError", "WeightsUnavailableError",
           "resolve_device"]

_PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Scorer(ABC):
    """Produces P [N images, M concepts]: how much each probe image shows each concept."""

    @abstractmethod
    def similarity(self, probe: ProbeSet, concepts: Sequence[str]) -> Tensor:
        """P as a float32 CPU tensor of shape [len(probe), len(concepts)]."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained CLIP weights could not be fetched (offline, blocked, or not in the local cache)."""


class UnknownConceptError(KeyError, ValueError):
    """Concepts that a :class:`GroundTruthScorer`'s dataset does not annotate: a wrong input (ValueError, what
    the CLIs show as one line), still a KeyError for callers that caught one before."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


class _DropLog(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip logs 'initialized randomly' before we load a local checkpoint into the model: drop it."""
    root, flt = logging.getLogger(), _DropLog("No pretrained weights loaded")
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _unavailable_message(model_name: str, pretrained: str, err: BaseException) -> str:
    return (
        f"could not fetch the pretrained weights for model_name={model_name!r}, pretrained={pretrained!r} "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). No network or no access to "
        "the Hugging Face hub? Either download the weights file on a machine with access (e.g. "
        "open_clip.download_pretrained(open_clip.get_pretrained_cfg(model_name, pretrained))) and pass "
        "checkpoint=/path/to/file (YAML: scorer.init_args.checkpoint; keep pretrained set to the tag so its "
        "preprocessing is used), or pre-populate the Hugging Face cache (HF_HOME) on this machine. "
        "Random weights are never used as a fallback."
    )


def _keeps_global_rng(init):
    """Run a constructor under a forked CPU RNG: building a model initialises weights randomly before
    loading them, and a scorer built in a training config (the dissection callback's) must not change the
    network that the run then initialises and trains."""
    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return init(*args, **kwargs)

    return wrapper


def _check_weights_file(path: str) -> None:
    """One clear error for a weights file that cannot be read as a state dict (truncated, corrupt, another
    format, no tensors), before open_clip reads it; cheap: the safetensors header, or the torch file mapped."""
    import pickle
    import zipfile

    from safetensors import SafetensorError

    if path.endswith((".npz", ".npy")):  # big_vision (SigLIP) weights: open_clip's own reader
        return
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                sd = dict.fromkeys(f.keys())
            has_tensors = bool(sd)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
                sd = sd["state_dict"]  # an open_clip training checkpoint
            has_tensors = isinstance(sd, dict) and any(isinstance(v, Tensor) for v in sd.values())
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError,
            SafetensorError) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"could not read checkpoint {path}: not a readable PyTorch or safetensors file (truncated, "
                         f"corrupt or another format; {type(e).__name__}: {first}); download it again") from None
    if not has_tensors:
        what = "a dict without tensors" if isinstance(sd, dict) else f"a {type(sd).__name__}"
        raise ValueError(f"could not read checkpoint {path}: it holds {what}, not a state dict of CLIP weights")


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

        if precision not in _PRECISIONS:
            raise ValueError(f"precision={precision!r} is not supported; choose one of {sorted(_PRECISIONS)}")
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
        self.batch_size, self.num_workers = batch_size, num_workers
        self.precision, self.progress = precision, progress
        self.cache = TensorCache(cache_dir) if use_cache else None

        tag_cfg: Dict[str, Any] = {}
        if pretrained is not None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
            if not tag_cfg:
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                hint = (f"known tags for {model_name}: {', '.join(tags)}" if tags
                        else f"{model_name} has no pretrained tags; pass checkpoint=/path/to/file")
                path_hint = " (a file path goes in checkpoint=, not pretrained=)" if os.path.exists(pretrained) else ""
                if checkpoint is not None:
                    hint += "; with checkpoint= set pretrained=None unless the file holds a known tag's weights"
                raise ValueError(f"unknown pretrained tag {pretrained!r} for {model_name}{path_hint}; {hint}")
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        self.quick_gelu = quick_gelu
        pp_kwargs = dict(image_mean=image_mean, image_std=image_std)

        if checkpoint is not None:
            checkpoint = os.fspath(os.path.expanduser(checkpoint))
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"CLIP checkpoint file not found: {checkpoint}")
            if tag_cfg:  # the file holds the tag's weights: use the tag's preprocessing, download nothing
                pp_kwargs = dict(
                    image_mean=image_mean or tag_cfg.get("mean"), image_std=image_std or tag_cfg.get("std"),
                    image_interpolation=tag_cfg.get("interpolation"), image_resize_mode=tag_cfg.get("resize_mode"))
            with _quiet_random_init_warning():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=None, force_quick_gelu=quick_gelu, **pp_kwargs)
            self._load_checkpoint(model, checkpoint)
            weights = {"source": "file", "sha256": hash_file(checkpoint)}
        elif pretrained is not None:
            try:
                # resolve the file first, so offline fails fast and with one clear error
                open_clip.download_pretrained(tag_cfg, cache_dir=hub_cache_dir)
            except Exception as e:
                raise WeightsUnavailableError(_unavailable_message(model_name, pretrained, e)) from e
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, force_quick_gelu=quick_gelu, cache_dir=hub_cache_dir,
                **pp_kwargs)
            weights = {"source": "tag", "tag": pretrained}
        else:
            if not allow_random_weights:
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                raise ValueError(
                    f"pretrained=None with no checkpoint would give {model_name} random weights. Pass a pretrained "
                    f"tag ({', '.join(tags) or 'none known for this architecture'}), checkpoint=/path/to/file, or "
                    "allow_random_weights=True if random weights are really intended (tests).")
            with _quiet_random_init_warning():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=None, force_quick_gelu=quick_gelu, **pp_kwargs)
            weights = {"source": "random", "sha256": hash_state_dict(model.state_dict())}

        try:
            self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=hub_cache_dir)
        except Exception as e:  # HF tokenizers for some architectures need the hub
            raise WeightsUnavailableError(
                f"could not load the tokenizer for {model_name} ({type(e).__name__}: {e}); pre-populate the "
                "Hugging Face cache or use an architecture with open_clip's built-in tokenizer") from e

        self.model = model.to(self.device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self._weights_parts = {"model_name": model_name, "quick_gelu": quick_gelu, **weights,
                               "open_clip": open_clip.__version__}
        self._memo: Dict[str, Tensor] = {}

    # ------------------------------------------------------------------ weights
    def _load_checkpoint(self, model: torch.nn.Module, path: str) -> None:
        """Read the file, then fit it to the architecture: each failure says which of the two went wrong, and
        anything else (a bug, out of memory) keeps its traceback."""
        import open_clip

        _check_weights_file(path)
        try:
            incompatible = open_clip.load_checkpoint(model, path, strict=False, weights_only=True)
        except RuntimeError as e:
            mismatched = [line.strip() for line in str(e).splitlines() if line.strip().startswith("size mismatch")]
            if not mismatched:
                raise
            raise ValueError(
                f"checkpoint {path} does not fit architecture {self.model_name!r}: {len(mismatched)} shape "
                f"mismatches ({'; '.join(mismatched[:3])}). Is model_name the architecture these weights were "
                "trained with?") from None
        missing = list(getattr(incompatible, "missing_keys", []) or [])
        unexpected = list(getattr(incompatible, "unexpected_keys", []) or [])
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match architecture {self.model_name!r}: "
                f"{len(missing)} missing keys (e.g. {missing[:5]}), {len(unexpected)} unexpected keys "
                f"(e.g. {unexpected[:5]}). Is model_name the architecture these weights were trained with?")

    # ------------------------------------------------------------------ caching
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
        dtype = _PRECISIONS[self.precision]
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

    # ------------------------------------------------------------------ public
    def image_embeddings(self, probe: ProbeSet) -> Tensor:
        """L2-normalised fp32 CLIP image embeddings [N, d] of the probe images (CPU), cached."""
        parts = {"kind": "clip-image", "weights": self._weights_parts, "preprocess": str(self.preprocess),
                 "probe": probe.identity, "n": len(probe), "precision": self.precision}
        return self._cached(parts, lambda: self._encode_images(probe))

    def text_embeddings(self, concepts: Sequence[str]) -> Tensor:
        """L2-normalised fp32 CLIP text embeddings [M, d] of the raw concept words (no template), cached."""
        concepts = [str(c) for c in concepts]
        if not concepts:
            raise ValueError("the concept list is empty")
        parts = {"kind": "clip-text", "weights": self._weights_parts, "concepts": hash_strings(concepts),
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

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Alias of :meth:`text_embeddings`, so a scorer can serve as the text embedder in evaluation."""
        return self.text_embeddings(texts)

    def similarity(self, probe: ProbeSet, concepts: Sequence[str]) -> Tensor:
        """P [N, M]: cosine similarity of each probe image with each concept word."""
        return self.image_embeddings(probe) @ self.text_embeddings(concepts).T

    def __repr__(self) -> str:
        src = f"checkpoint={self.checkpoint!r}" if self.checkpoint else f"pretrained={self.pretrained!r}"
        return f"CLIPScorer(model_name={self.model_name!r}, {src}, device={str(self.device)!r})"


class GroundTruthScorer(Scorer):
    """P from a dataset's own concept annotations: ``scale`` where the concept is present, 0 elsewhere.

    Why the scale: soft-WPMI's defaults (a=10) are calibrated for CLIP cosine similarities, whose gaps
    between a present and an absent concept are ~0.1-0.3; ``scale=0.3`` puts ground truth on that scale
    (a * P gap = 3), ``scale=1`` gives the raw 0/1 matrix. Either way soft-WPMI saturates (every concept a
    unit dominates scores log K) and the labeling decides such ties by a second key
    (:mod:`lwta_vision.dissect.engine`); measured on the quickstart's fc over seeds 0-2 (RESULTS.md §0),
    both scales then name the same 17/18 classes, and 0.3 leaves slightly fewer labels to the tie-break.

    The rows belong to one dataset, by identity: :meth:`similarity` refuses a probe set built on another one,
    even of the same length (the val and test splits of the generated data both have 1000 images, and
    annotations of the one would silently label the other). A view of the annotated dataset
    (``probe.first(n)``) gets its own rows.

    Args:
        presence: [N images, M concepts] tensor, nonzero where the concept is present.
        concept_names: the M column names.
        dataset: optional; the dataset the rows belong to, checked against the probe set's dataset (without
            it any probe set of N images is accepted).
        scale: the value of a present concept.
    """

    def __init__(self, presence: Tensor, concept_names: Sequence[str], dataset: Optional[object] = None,
                 scale: float = 0.3):
        if scale <= 0:
            raise ValueError(f"GroundTruthScorer scale must be > 0, got {scale}")
        self.scale = float(scale)
        presence = torch.as_tensor(presence)
        if presence.ndim != 2 or presence.shape[1] != len(concept_names):
            raise ValueError(f"presence must be [N images, {len(concept_names)} concepts]; got {tuple(presence.shape)}")
        self.presence = presence.float()
        self.concept_names = [str(c) for c in concept_names]
        self.dataset = dataset
        self._index: Dict[str, int] = {}
        for j, name in enumerate(self.concept_names):
            norm = _norm(name)
            if norm in self._index:
                raise ValueError(f"duplicate concept name {name!r} (column {self._index[norm]} and {j})")
            self._index[norm] = j

    @classmethod
    def from_dataset(cls, dataset: object, scale: float = 0.3) -> "GroundTruthScorer":
        """From a dataset with ``presence_matrix() -> Tensor[N, M]`` and ``concept_names`` (e.g. the shapes data)."""
        if not hasattr(dataset, "presence_matrix") or not hasattr(dataset, "concept_names"):
            raise TypeError(f"{type(dataset).__name__} has no concept annotations: GroundTruthScorer.from_dataset "
                            "needs presence_matrix() and concept_names (e.g. ShapesConceptDataset)")
        return cls(dataset.presence_matrix(), list(dataset.concept_names), dataset=dataset, scale=scale)

    def similarity(self, probe: ProbeSet, concepts: Sequence[str]) -> Tensor:
        """``scale`` x the presence rows of the probe's images, with columns in the order of ``concepts``."""
        presence = self._rows(probe)
        unknown = [c for c in concepts if _norm(c) not in self._index]
        if unknown:
            hints = [f"{c!r} (close: {difflib.get_close_matches(c, self.concept_names, n=3)})" for c in unknown[:5]]
            raise UnknownConceptError(f"{len(unknown)} concepts are not annotated in the dataset: {', '.join(hints)}; "
                                      f"annotated: {', '.join(self.concept_names[:30])}"
                                      f"{' ...' if len(self.concept_names) > 30 else ''}")
        cols = torch.tensor([self._index[_norm(c)] for c in concepts], dtype=torch.long)
        return (presence != 0).float().index_select(1, cols) * self.scale

    def _rows(self, probe: ProbeSet) -> Tensor:
        """The presence rows of ``probe``'s images: all of them for the annotated dataset, the first n for a
        ``first(n)`` view of it; any other dataset is refused, whatever its length."""
        n = self.presence.shape[0]
        if self.dataset is not None:
            base, _ = _prefix_of(self.dataset)
            probe_base, k = _prefix_of(probe.dataset)
            if probe_base is not base:
                raise ValueError(
                    f"probe set {probe.name!r} ({_describe_dataset(probe_base, len(probe))}) is not built on the "
                    f"annotated dataset ({_describe_dataset(base, n)}); ground-truth P needs the probe set to be "
                    "built on the same dataset: GroundTruthScorer.from_dataset(probe.dataset)")
            if k <= n:
                return self.presence[:k]
        if len(probe) != n:
            raise ValueError(f"probe set {probe.name!r} has {len(probe)} images but the annotations cover {n}")
        return self.presence


def _prefix_of(dataset) -> tuple[object, int]:
    """``(the dataset under any ProbeSet.first(n) views, how many of its first items the view holds)``."""
    n = len(dataset)
    while isinstance(dataset, _FirstN):
        dataset = dataset.dataset
        n = min(n, len(dataset))
    return dataset, n


def _describe_dataset(dataset, n: int) -> str:
    split = getattr(dataset, "split", None)
    return f"{n} images of {type(dataset).__name__}" + (f", split {split!r}" if isinstance(split, str) else "")


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())
