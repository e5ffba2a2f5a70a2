"""ImageNet (ILSVRC2012) DataModule over an ImageFolder layout or torchvision's ImageNet layout.

Class names are the human-readable names of the 1000 classes (``dissect/concept_sets/imagenet1k.txt``, the
names CLIP-Dissect and open_clip use), matched to WordNet ids through ``imagenet_wnids.txt``: the 1000 wnids
of ILSVRC2012 in sorted order, which is the label order of every ImageFolder-style ImageNet loader (a copy
of ``timm/data/_info/imagenet_synsets.txt``, Apache-2.0; the two lists were checked index by index against
the synset lemmas). Any other folder set (a 10-class subset, your own data) keeps its folder names, mapped
to readable names where a folder is a known wnid.
"""
from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from typing import Callable, Optional, Sequence

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import transforms as T

from lwta_vision.data.base import VisionDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_URL = "https://image-net.org/download-images.php"
META_FILE = "meta.bin"  # written by torchvision.datasets.ImageNet from the devkit
DEVKIT_FILE = "ILSVRC2012_devkit_t12.tar.gz"
IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 WordNet ids in sorted order (label i of a standard ImageNet loader)."""
    text = resources.files("lwta_vision.data").joinpath("imagenet_wnids.txt").read_text("utf-8")
    return tuple(text.split())


@lru_cache(maxsize=None)
def imagenet_class_names() -> tuple[str, ...]:
    """Readable names of the 1000 classes, in label order ("tench", "goldfish", ...)."""
    text = resources.files("lwta_vision").joinpath("dissect", "concept_sets", "imagenet1k.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def readable_class_names(folders: Sequence[str]) -> list[str]:
    """Folder names -> class names: a known ImageNet wnid becomes its readable name, anything else stays."""
    names = dict(zip(imagenet_wnids(), imagenet_class_names()))
    return [names.get(f, f) for f in folders]


def eval_resize(image_size: int, resize: Optional[int]) -> int:
    """The eval resize for ``image_size`` (``round(image_size / 0.875)``: 256 for 224), checked."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}; set data.init_args.image_size")
    resize = round(image_size / 0.875) if resize is None else resize
    if resize < image_size:
        raise ValueError(f"resize={resize} is smaller than image_size={image_size}, so the center crop would not "
                         f"fit; set data.init_args.resize >= image_size (or leave it out)")
    return resize


def imagenet_eval_transform(image_size: int, resize: int, mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD) -> Callable:
    """PIL -> tensor at evaluation: Resize(resize) (shorter side), CenterCrop(image_size), normalise."""
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def imagenet_augmentation(image_size: int) -> list[Callable]:
    """PIL -> PIL training augmentation of the ResNet and DeiT baselines: RandomResizedCrop + flip."""
    return [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]


def class_folders(split_dir: str) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (ImageFolder's class order); hidden ones skipped."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


class ImageNetPipelines:
    """The standard ImageNet train/eval pipelines for a VisionDataModule with ``image_size`` and ``resize``
    (shared by the folder and the streaming data modules)."""

    @property
    def eval_transform(self) -> Callable:
        """Resize the shorter side to ``resize``, center-crop ``image_size``, normalise."""
        return imagenet_eval_transform(self.image_size, self.resize, self.mean, self.std)

    def _augmentation(self) -> list[Callable]:
        return imagenet_augmentation(self.image_size)


class ImageNetDataModule(ImageNetPipelines, VisionDataModule):
    """ImageNet-1k (or any ImageFolder): ``train/`` for training, ``val/`` for validation and test.

    Layouts, detected from ``data_dir``:

    - ImageFolder: ``data_dir/train/<class>/*.JPEG`` and ``data_dir/val/<class>/*.JPEG``.
    - torchvision: ``data_dir/meta.bin`` (written by ``torchvision.datasets.ImageNet`` from
      ``ILSVRC2012_devkit_t12.tar.gz``) beside ``train/`` and ``val/`` or the archives they unpack from;
      read through ``torchvision.datasets.ImageNet``, which unpacks missing splits from the archives once.

    The labelled test images of ILSVRC2012 were never released, so "test" is the validation split, as in
    every ImageNet paper. Class names are known before any image is read: from the class folders of
    ``train/`` when it exists, otherwise the standard 1000 (so a config builds before the data is there).

    Args:
        data_dir: the ImageNet root.
        image_size: side of the square crops the network sees (224).
        resize: shorter side the eval images are resized to before the center crop; default
            ``round(image_size / 0.875)`` (256 for 224, the standard ratio).
        batch_size, num_workers, seed, augment, pin_memory: see :class:`VisionDataModule`.
    """

    name = "imagenet"
    in_channels = 3
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, data_dir: str, image_size: int = 224, resize: Optional[int] = None, batch_size: int = 256,
                 num_workers: int = 8, seed: int = 0, augment: bool = True, pin_memory: bool = False):
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=None, seed=seed,
                         augment=augment, pin_memory=pin_memory)
        self.image_size, self.resize = image_size, eval_resize(image_size, resize)
        train_dir = os.path.join(data_dir, "train")
        self.folder_names = class_folders(train_dir) if os.path.isdir(train_dir) else list(imagenet_wnids())
        self.class_names = readable_class_names(self.folder_names)
        self.num_classes = len(self.class_names)

    # ----------------------------------------------------------------------------------------- layout
    @property
    def _has_meta(self) -> bool:
        return os.path.isfile(os.path.join(self.data_dir, META_FILE))

    @property
    def _torchvision_layout(self) -> bool:
        """``meta.bin``, or the devkit that torchvision makes it from, is in ``data_dir``."""
        return any(os.path.isfile(os.path.join(self.data_dir, f)) for f in (META_FILE, DEVKIT_FILE))

    def _expected(self) -> str:
        return (f"Expected {os.path.join(self.data_dir, 'train')}/<class>/*.JPEG and "
                f"{os.path.join(self.data_dir, 'val')}/<class>/*.JPEG (one folder per class, e.g. n01440764/), "
                f"or torchvision's layout ({META_FILE} from the devkit beside the ILSVRC2012 archives). ImageNet "
                f"is not downloaded for you: get it from {DOWNLOAD_URL}, then point data.init_args.data_dir at "
                f"the folder that holds train/ and val/")

    def _check_splits(self) -> None:
        """Raise one clear error for a missing root or split (torchvision's layout may still hold archives)."""
        if not os.path.isdir(self.data_dir):
            raise FileNotFoundError(f"ImageNet root {self.data_dir!r} does not exist. {self._expected()}.")
        for split in ("train", "val"):
            if os.path.isdir(os.path.join(self.data_dir, split)):
                continue
            archive = os.path.join(self.data_dir, f"ILSVRC2012_img_{split}.tar")
            if self._torchvision_layout and os.path.isfile(archive):
                continue  # torchvision unpacks it in prepare_data
            hint = (" The official validation archive is flat (50,000 files, no class folders): unpack it with "
                    "torchvision.datasets.ImageNet(root, split='val') and the devkit, or sort it into class "
                    "folders with the usual valprep.sh." if split == "val" else "")
            raise FileNotFoundError(f"ImageNet root {self.data_dir!r} has no {split}/ folder.{hint} "
                                    f"{self._expected()}.")

    def _check_classes(self) -> None:
        """Raise one clear error for a split without class folders or train/val class folders that differ."""
        train, val = (class_folders(os.path.join(self.data_dir, s)) for s in ("train", "val"))
        for split, folders in (("train", train), ("val", val)):
            if not folders:
                raise FileNotFoundError(f"ImageNet {split} split {os.path.join(self.data_dir, split)!r} is empty: it "
                                        f"has no class folders. {self._expected()}.")
        if train != val:
            only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
            raise ValueError(
                f"ImageNet train/ and val/ in {self.data_dir!r} have different class folders ({len(train)} vs "
                f"{len(val)}; only in train/: {_preview(only_train)}; only in val/: {_preview(only_val)}). Labels "
                f"are folder indices, so both splits need the same class folders: add or remove folders so "
                f"they match")
        if train != self.folder_names:
            raise ValueError(f"the class folders of {os.path.join(self.data_dir, 'train')!r} changed after the "
                             f"DataModule was created ({len(self.folder_names)} then, {len(train)} now); create "
                             f"it again so the model gets the right classes")

    def prepare_data(self) -> None:
        """Check the layout; with torchvision's layout, unpack missing splits from the archives (rank 0)."""
        self._check_splits()
        if self._torchvision_layout:
            for split in ("train", "val"):  # torchvision writes meta.bin and unpacks a split's archive if needed
                if not os.path.isdir(os.path.join(self.data_dir, split)) or not self._has_meta:
                    self._open(split)
        self._check_classes()

    def _open(self, split: str) -> Dataset:
        split_dir = os.path.join(self.data_dir, split)
        try:
            if self._torchvision_layout:
                return datasets.ImageNet(self.data_dir, split=split)
            return datasets.ImageFolder(split_dir)
        except FileNotFoundError as e:  # ImageFolder: a class folder (or every one) holds no image
            empty = [c for c in class_folders(split_dir) if not _has_image(os.path.join(split_dir, c))]
            what = ("is empty: no class folder holds an image" if len(empty) == len(class_folders(split_dir))
                    else f"has class folders without images: {_preview(empty)}")
            raise FileNotFoundError(
                f"ImageNet {split} split {split_dir!r} {what}; expected image files "
                f"({', '.join(IMAGE_EXTENSIONS)}) in every class folder. Remove the empty folders from both "
                f"train/ and val/, or fill them") from e
        except RuntimeError as e:  # torchvision.datasets.ImageNet: a corrupt meta.bin, devkit or archive
            raise FileNotFoundError(f"torchvision could not read ImageNet in {self.data_dir!r}: {e} Download the "
                                    f"file again, or remove {META_FILE} and {DEVKIT_FILE} to read the ImageFolder "
                                    f"layout instead. {self._expected()}.") from e

    def _load_raw_splits(self) -> dict[str, Dataset]:
        self._check_splits()
        self._check_classes()
        val = self._open("val")
        return {"train": self._open("train"), "val": val, "test": val}


def _has_image(folder: str) -> bool:
    for _, _, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            return True
    return False


def _preview(names: Sequence[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
