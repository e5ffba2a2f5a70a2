"""Content-keyed, atomically written tensor cache.

Every entry is named by a hash of *what produced it* (:func:`cache_key`) and carries those parts inside
the file, so a load can verify them: a renamed file, a hash collision or a half-written copy is rejected
and recomputed, never silently reused (the failure mode of caches keyed by name strings).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

_FORMAT = 1


def default_cache_dir() -> Path:
    """``$LWTA_VISION_CACHE`` if set, else ``~/.cache/lwta_vision``."""
    env = os.environ.get("LWTA_VISION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lwta_vision"


def _canonical(parts: Mapping[str, Any]) -> str:
    try:
        return json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cache key parts must be JSON-serialisable strings, numbers, lists or dicts: {e}") from e


def cache_key(**parts: Any) -> str:
    """sha256 (hex) of a canonical JSON of ``parts`` (strings, numbers, bools, None, lists, dicts)."""
    return hashlib.sha256(_canonical(parts).encode("utf-8")).hexdigest()


def hash_strings(items) -> str:
    """sha256 of a list of strings, order-sensitive and unambiguous (e.g. for a concept list)."""
    return hashlib.sha256(_canonical({"items": list(items)}).encode("utf-8")).hexdigest()


def hash_file(path: Union[str, os.PathLike], chunk_size: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}|{t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TensorCache:
    """A folder of ``<key>.pt`` files holding ``dict[str, Tensor]`` plus the key parts that produced them.

    Writes go to a temp file in the same folder and are moved into place with ``os.replace``, so a reader
    never sees a partial file. A file that cannot be read (truncated, garbage) or whose stored parts do
    not hash to the requested key is warned about, deleted and treated as a miss.

    Args:
        root: cache folder; default :func:`default_cache_dir`.
    """

    def __init__(self, root: Union[str, os.PathLike, None] = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str, parts: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, torch.Tensor]]:
        """The tensors stored under ``key``, or None on a miss.

        ``parts`` (the dict the key was made from), when given, must equal the stored parts exactly; this
        also rejects a sha256 collision. Without it the stored parts must still hash to ``key``.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
                raise ValueError("not a lwta_vision cache file")
            stored_key, meta, tensors = blob["key"], blob["meta"], blob["tensors"]
            if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError("payload is not a dict of tensors")
        except Exception as e:  # truncated zip, garbage bytes, unpickling error, wrong layout
            warnings.warn(f"cache file {path} is unreadable ({type(e).__name__}: {e}); deleting it and recomputing")
            self._remove(path)
            return None
        if stored_key != key or cache_key(**meta) != key:
            warnings.warn(f"cache file {path} was written for other inputs (renamed or copied?); deleting it")
            self._remove(path)
            return None
        if parts is not None and _canonical(meta) != _canonical(parts):
            warnings.warn(f"cache file {path} has the right hash but different key parts (sha256 collision?); "
                          "ignoring it")
            return None
        return tensors

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        """Store ``tensors`` under ``key`` atomically; ``meta`` are the parts with ``cache_key(**meta) == key``."""
        if cache_key(**meta) != key:
            raise ValueError("meta must be the exact parts the key was made from: cache_key(**meta) != key")
        self.root.mkdir(parents=True, exist_ok=True)
        blob = {
            "format": _FORMAT,
            "key": key,
            "meta": dict(meta),
            # clone: torch.save writes a view's whole storage
            "tensors": {k: v.detach().cpu().clone() for k, v in tensors.items()},
        }
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(blob, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(key))
        except BaseException:
            self._remove(Path(tmp))
            raise
        return self.path(key)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
