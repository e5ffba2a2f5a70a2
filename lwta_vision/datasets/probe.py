"""Probe sets: the images a network is dissected on.

A probe set keeps images *raw* (PIL, untransformed) so that each consumer applies its own preprocessing:
the target network its eval transform, CLIP its own ``preprocess``, the HTML report none at all.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def _to_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, torch.Tensor):
        arr = img.detach().cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        img = arr
    if isinstance(img, np.ndarray):
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        return Image.fromarray(img).convert("RGB")
    raise TypeError(f"probe dataset returned an image of type {type(img).__name__}; expected PIL, ndarray or tensor")


class _Transformed(Dataset):
    def __init__(self, probe: "ProbeSet", transform: Callable, grayscale: bool = False):
        self.probe, self.transform, self.grayscale = probe, transform, grayscale

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int):
        img = self.probe.raw(i)
        if self.grayscale:
            img = img.convert("L")
        return self.transform(img), i


class _FirstN(Dataset):
    """The first n items of a dataset, forwarding its annotations (concept names, masks, presence rows)."""

    def __init__(self, ds, n: int):
        self.dataset, self.n = ds, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i >= self.n:
            raise IndexError(i)
        return self.dataset[i]

    def __getattr__(self, name):
        if name in ("dataset", "n"):
            raise AttributeError(name)
        attr = getattr(self.dataset, name)  # AttributeError when the dataset has no such annotation
        if name == "presence_matrix":
            return lambda: attr()[: self.n]
        return attr


class ProbeSet:
    """Raw images to dissect on, with the target network's transform and a stable identity for caches.

    Args:
        dataset: any indexable dataset whose items are ``(image, label)`` or ``image``, with the image
            raw (PIL, HWC uint8 array, or CHW float tensor in [0, 1]); no normalisation.
        transform: the target network's eval transform (PIL -> tensor).
        name: a human-readable name used in reports and cache keys.
        grayscale: feed the network single-channel images (e.g. Fashion-MNIST models).
    """

    def __init__(self, dataset: Dataset, transform: Callable, name: str, grayscale: bool = False):
        self.dataset, self.transform, self.name, self.grayscale = dataset, transform, name, grayscale
        self._identity: Optional[str] = None

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, i: int) -> Image.Image:
        """The i-th image as an RGB PIL image, untransformed."""
        item = self.dataset[i]
        if isinstance(item, (tuple, list)):
            item = item[0]
        return _to_pil(item)

    def label(self, i: int) -> Optional[int]:
        item = self.dataset[i]
        if isinstance(item, (tuple, list)) and len(item) > 1:
            return int(item[1])
        return None

    def first(self, n: int) -> "ProbeSet":
        """The first ``n`` images (annotations such as masks and presence rows follow)."""
        return ProbeSet(_FirstN(self.dataset, n), self.transform, f"{self.name}[:{n}]", self.grayscale)

    def network_dataset(self) -> Dataset:
        """Dataset of ``(network_input, index)`` for recording activations."""
        return _Transformed(self, self.transform, self.grayscale)

    def with_transform(self, transform: Callable) -> Dataset:
        """Dataset of ``(transform(raw RGB image), index)``, e.g. for CLIP preprocessing."""
        return _Transformed(self, transform, False)

    @property
    def identity(self) -> str:
        """Hash of the name, size and the pixels of up to 32 evenly spaced images.

        Cheap enough to compute on every run and changes whenever the probe set's content, order or size
        does in practice (a change to an image not sampled is the documented blind spot).
        """
        if self._identity is None:
            h = hashlib.sha256()
            n = len(self)
            h.update(f"{self.name}|{n}|{type(self.dataset).__name__}".encode())
            for i in sorted(set(np.linspace(0, max(n - 1, 0), num=min(n, 32)).astype(int).tolist())):
                h.update(np.asarray(self.raw(i)).tobytes())
            self._identity = h.hexdigest()[:16]
        return self._identity


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolderImages(Dataset):
    """Every image file under a folder (recursively, sorted), as ``(PIL image, -1)``.

    Class sub-folders are not required: a probe set is just images. Files with other extensions and hidden
    files and folders (names starting with ".") are skipped; an image that cannot be decoded is a clear error
    naming the file.
    """

    def __init__(self, root: str):
        import os

        if not os.path.isdir(root):
            raise FileNotFoundError(f"probe image folder {root!r} does not exist")
        files, skipped = [], 0
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints, .git, ...
            for n in names:
                # hidden files are never probe images (macOS writes "._photo.jpg" beside photo.jpg)
                if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."):
                    files.append(os.path.join(dirpath, n))
                else:
                    skipped += 1
        if not files:
            raise ValueError(
                f"probe folder {root!r} contains no images ({skipped} other file(s)); expected files ending in "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )
        self.root, self.files, self.skipped = root, sorted(files), skipped

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), -1
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read probe image {path!r}: {err}; remove it or convert it to PNG/JPEG") from None
