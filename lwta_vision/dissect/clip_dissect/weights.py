"""open_clip weights for CLIP-Dissect: a pretrained tag, a local file, or random init only when asked.

Never a silent fallback: a tag that cannot be fetched raises :class:`WeightsUnavailableError` naming how to
provide the file, and a file that cannot be read, or does not fit the architecture, says which of the two.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from lwta_vision.dissect.cache import hash_file, hash_state_dict
from lwta_vision.dissect.errors import WeightsUnavailableError


@dataclass
class LoadedCLIP:
    """An open_clip model with its preprocessing and tokenizer, and what identifies its weights (for caches)."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    weights: Dict[str, Any]  # source ("tag", "file", "random") and the tag or the weights' sha256
    quick_gelu: bool


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


def load_clip(
    model_name: str,
    pretrained: Optional[str],
    checkpoint: Optional[str] = None,
    allow_random_weights: bool = False,
    quick_gelu: Optional[bool] = None,
    image_mean: Optional[Tuple[float, float, float]] = None,
    image_std: Optional[Tuple[float, float, float]] = None,
    hub_cache_dir: Optional[str] = None,
) -> LoadedCLIP:
    """Build ``model_name`` (an open_clip architecture name, already checked) with the weights asked for.

    ``checkpoint`` (a file) wins over ``pretrained``, which then only names the weights: a known tag's
    preprocessing and QuickGELU are used and nothing is downloaded. Random init needs ``pretrained=None``
    and ``allow_random_weights=True``. See :class:`lwta_vision.dissect.clip_dissect.CLIPScorer`.
    """
    import open_clip

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
        _load_checkpoint(model, checkpoint, model_name)
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
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=hub_cache_dir)
    except Exception as e:  # HF tokenizers for some architectures need the hub
        raise WeightsUnavailableError(
            f"could not load the tokenizer for {model_name} ({type(e).__name__}: {e}); pre-populate the "
            "Hugging Face cache or use an architecture with open_clip's built-in tokenizer") from e

    return LoadedCLIP(model=model, preprocess=preprocess, tokenizer=tokenizer, weights=weights, quick_gelu=quick_gelu)


def _load_checkpoint(model: torch.nn.Module, path: str, model_name: str) -> None:
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
            f"checkpoint {path} does not fit architecture {model_name!r}: {len(mismatched)} shape "
            f"mismatches ({'; '.join(mismatched[:3])}). Is model_name the architecture these weights were "
            "trained with?") from None
    missing = list(getattr(incompatible, "missing_keys", []) or [])
    unexpected = list(getattr(incompatible, "unexpected_keys", []) or [])
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match architecture {model_name!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:5]}), {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:5]}). Is model_name the architecture these weights were trained with?")
