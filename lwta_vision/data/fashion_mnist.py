"""Fashion-MNIST from idx files: torchvision's layout, or the flat folder the Debian package installs."""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from lwta_vision.data.base import ArrayImageDataset, VisionDataModule
from lwta_vision.datasets.idx import read_idx  # noqa: F401  (documented here)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

def find_fashion_mnist_files(data_dir: str) -> Optional[dict[tuple[str, str], str]]:
    """Paths of the four idx files under ``data_dir``, or ``None`` if any is missing.

    Looks in ``<data_dir>/FashionMNIST/raw/`` (torchvision) and then ``<data_dir>/`` (Debian's
    ``dataset-fashion-mnist``, or any flat copy), each file plain or ``.gz``.
    """
    found = {}
    for key, name in FASHION_MNIST_FILES.items():
        candidates = [os.path.join(folder, name + ext)
                      for folder in (os.path.join(data_dir, "FashionMNIST", "raw"), data_dir)
                      for ext in ("", ".gz")]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            return None
        found[key] = path
    return found


class FashionMNISTDataModule(VisionDataModule):
    """Fashion-MNIST: 60k train (``val_fraction`` held out for validation) and the official 10k test.

    Reads the idx files directly, so the Debian package's copy works without torchvision's layout.

    Args:
        data_dir: folder with the four idx files, flat or as ``FashionMNIST/raw/`` (plain or ``.gz``).
            The default is where ``apt-get install dataset-fashion-mnist`` puts them.
        download: fetch the files with torchvision (into ``<data_dir>/FashionMNIST/raw``) when missing.
        batch_size, num_workers, val_fraction, seed, augment, pin_memory: see :class:`VisionDataModule`.
    """

    name = "fashion_mnist"
    num_classes = 10
    class_names = FASHION_MNIST_CLASSES
    in_channels = 1
    image_size = 28
    mean = (0.2860,)
    std = (0.3530,)

    def __init__(self, data_dir: str = DEBIAN_DIR, download: bool = False, batch_size: int = 128,
                 num_workers: int = 2, val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
                 pin_memory: bool = False):
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         seed=seed, augment=augment, pin_memory=pin_memory)
        self.download = download

    def _not_found(self, why: str) -> FileNotFoundError:
        names = ", ".join(FASHION_MNIST_FILES.values())
        return FileNotFoundError(
            f"Fashion-MNIST not found in {self.data_dir} ({why}). Expected the files {names} (each may end in "
            f".gz) either directly in {self.data_dir}/ or in {os.path.join(self.data_dir, 'FashionMNIST', 'raw')}/"
            f". Install them with `apt-get install dataset-fashion-mnist` (puts them in {DEBIAN_DIR}), "
            f"pass download=True, or point data.init_args.data_dir at a folder that has them.")

    def prepare_data(self) -> None:
        """Download with torchvision when the files are missing and ``download`` is set."""
        if find_fashion_mnist_files(self.data_dir) is not None:
            return
        if not self.download:
            raise self._not_found("download=False")
        try:
            datasets.FashionMNIST(self.data_dir, train=True, download=True)
        except Exception as e:  # no network, read-only folder: one message saying what to do instead
            raise self._not_found(f"download failed: {type(e).__name__}: {e}") from e

    def _load_raw_splits(self) -> dict[str, Dataset]:
        files = find_fashion_mnist_files(self.data_dir)
        if files is None:
            raise self._not_found("some files are missing")
        splits = {}
        for split in ("train", "test"):
            images, labels = read_idx(files[split, "images"]), read_idx(files[split, "labels"])
            if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"{files[split, 'images']} and {files[split, 'labels']} do not form a dataset: "
                                 f"images {images.dtype} {images.shape}, labels {labels.shape}; expected "
                                 f"uint8 [N, 28, 28] images and [N] labels")
            splits[split] = ArrayImageDataset(images, labels)
        return splits

    def _augmentation(self) -> list[Callable]:
        return [T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()]
