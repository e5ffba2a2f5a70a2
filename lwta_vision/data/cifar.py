"""CIFAR-10 and CIFAR-100 DataModules over torchvision's on-disk layout (the "python version" archives)."""
from __future__ import annotations

import os
from typing import Callable

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from lwta_vision.data.base import VisionDataModule

# Public constants, hard-coded so that class names exist before the data does (LightningCLI links them
# into the model at instantiation, before anything is downloaded). Same order as the archives' meta files.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose",
    "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel",
    "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]


class _TrustingFilesMixin:
    """Accept CIFAR files that exist instead of checking their MD5 sums.

    torchvision rejects any file whose MD5 differs from the official archive's, which rules out test
    fixtures, re-pickled copies and subsets; a truncated or foreign file still fails loudly when unpickled.
    Class names come from the constants above, so the meta file is not needed either.
    """

    classes_constant: list[str]

    def _files(self) -> list[str]:
        return [os.path.join(self.root, self.base_folder, f) for f, _ in self.train_list + self.test_list]

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(f) for f in self._files())

    def _load_meta(self) -> None:
        self.classes = list(self.classes_constant)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10Files(_TrustingFilesMixin, datasets.CIFAR10):
    """torchvision's CIFAR10 without the MD5 check (see :class:`_TrustingFilesMixin`)."""

    classes_constant = CIFAR10_CLASSES


class CIFAR100Files(_TrustingFilesMixin, datasets.CIFAR100):
    """torchvision's CIFAR100 (fine labels) without the MD5 check (see :class:`_TrustingFilesMixin`)."""

    classes_constant = CIFAR100_CLASSES


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10: 50k train (``val_fraction`` of it held out for validation) and the official 10k test.

    Expects ``<data_dir>/cifar-10-batches-py/`` (the extracted python-version archive); with
    ``download=True`` torchvision fetches it when missing.

    Args:
        data_dir: folder that holds (or will hold) the extracted archive.
        download: fetch the archive if it is not in ``data_dir``.
        batch_size, num_workers, val_fraction, seed, augment, pin_memory: see :class:`VisionDataModule`.
    """

    name = "cifar10"
    num_classes = 10
    class_names = CIFAR10_CLASSES
    in_channels = 3
    image_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    _dataset_cls = CIFAR10Files
    _archive_url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

    def __init__(self, data_dir: str, download: bool = True, batch_size: int = 128, num_workers: int = 2,
                 val_fraction: float = 0.1, seed: int = 0, augment: bool = True, pin_memory: bool = False):
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         seed=seed, augment=augment, pin_memory=pin_memory)
        self.download = download

    @property
    def dataset_dir(self) -> str:
        return os.path.join(self.data_dir, self._dataset_cls.base_folder)

    def _missing(self) -> list[str]:
        cls = self._dataset_cls
        return [f for f, _ in cls.train_list + cls.test_list
                if not os.path.isfile(os.path.join(self.dataset_dir, f))]

    def _not_found(self, why: str) -> FileNotFoundError:
        cls = self._dataset_cls
        files = ", ".join(f for f, _ in cls.train_list + cls.test_list)
        return FileNotFoundError(
            f"{self.name} not found in {self.dataset_dir} ({why}). Expected the files {files} there: "
            f"download {self._archive_url} and extract it into {self.data_dir} (it unpacks to "
            f"{cls.base_folder}/), or point data.init_args.data_dir at the folder that contains "
            f"{cls.base_folder}/.")

    def prepare_data(self) -> None:
        """Download the archive once (rank 0 only, as Lightning calls it) when files are missing."""
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            raise self._not_found(f"missing {', '.join(missing)}; download=False")
        try:
            self._dataset_cls(self.data_dir, train=True, download=True)
        except Exception as e:  # no network, proxy, disk full: one message saying what to do instead
            raise self._not_found(f"missing {', '.join(missing)}; download failed: {type(e).__name__}: {e}") from e

    def _load_raw_splits(self) -> dict[str, Dataset]:
        missing = self._missing()
        if missing:
            raise self._not_found(f"missing {', '.join(missing)}")
        return {"train": self._dataset_cls(self.data_dir, train=True),
                "test": self._dataset_cls(self.data_dir, train=False)}

    def _augmentation(self) -> list[Callable]:
        return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 with the 100 fine labels; expects ``<data_dir>/cifar-100-python/``.

    Args: as :class:`CIFAR10DataModule`.
    """

    name = "cifar100"
    num_classes = 100
    class_names = CIFAR100_CLASSES
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    _dataset_cls = CIFAR100Files
    _archive_url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
