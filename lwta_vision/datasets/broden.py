"""Read the Broden dataset (Bau, Zhou et al. 2017) as a probe set with per-pixel concept masks.

Layout of an unpacked Broden folder (e.g. ``broden1_224``)::

    index.csv   image,split,ih,iw,sh,sw,color,object,part,material,scene,texture
                one row per image; each category cell is empty or ';'-separated entries: segmentation
                PNG paths relative to images/ (pixel categories), or label numbers (image-level: scene,
                texture)
    label.csv   number,name,category,frequency,coverage,syns; category like "material(36);object(3)",
                the number in brackets counting the images where the label appears in that category
    c_<category>.csv   per-category codes (not needed here: label.csv has everything)
    images/<image>.jpg and the segmentation PNGs, whose label number per pixel is R + 256 * G (0 = none)

``BrodenDataset`` is at once a probe dataset (``(PIL image, -1)`` items) and a mask source for
:func:`lwta_vision.dissect.netdissect.iou_dissect`. Masks are at segmentation resolution (sh x sw): Network
Dissection upsamples activation maps to it.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

INDEX_FIELDS = ("image", "split", "ih", "iw", "sh", "sw")
LABEL_FIELDS = ("number", "name", "category")
LAYOUT = ("a Broden folder holds index.csv (image,split,ih,iw,sh,sw,<one column per category>), label.csv "
          "(number,name,category,frequency,coverage,syns) and images/ with the JPEGs and segmentation PNGs")
_CATEGORY = re.compile(r"^\s*([^()]+?)\s*(?:\((\d*)\))?\s*$")


@dataclass
class _Image:
    path: str  # relative to images/
    split: str
    sh: int
    sw: int
    pngs: list[str]  # segmentation files of the selected pixel categories
    labels: list[int]  # image-level label numbers of the selected categories


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, row dict)]), after checking the required columns."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        missing = [c for c in required if c not in fields]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} (header: {','.join(fields)}); {LAYOUT}")
        return fields, [(reader.line_num, row) for row in reader]


def _int(value, path: Path, line: int, column: str) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise ValueError(f"{path}, line {line}: column {column!r} must be an integer, got {value!r}") from None


def _parse_categories(cell: str, path: Path, line: int) -> dict[str, int]:
    """``"material(36);object(3)"`` -> ``{"material": 36, "object": 3}`` (a missing count reads as 0)."""
    out = {}
    for part in filter(None, (p.strip() for p in (cell or "").split(";"))):
        m = _CATEGORY.match(part)
        if not m:
            raise ValueError(f"{path}, line {line}: category entry {part!r} is not of the form 'name(count)'")
        out[m.group(1)] = int(m.group(2) or 0)
    return out


class BrodenDataset(Dataset):
    """Broden images with per-pixel concept masks; a probe dataset and a mask source in one.

    Concepts are the labels of ``label.csv`` in any selected category, ordered by label number (number 0,
    "no label", is skipped). A label listed under several categories takes the one where it appears in
    the most images (the bracketed counts; ties go to the first listed), close to NetDissect's choice of
    the category where it covers the most pixels. Images without any annotation in the selected
    categories are dropped, as in NetDissect: they would only add activation to every union.

    Args:
        root: the Broden folder (the one holding index.csv).
        categories: category columns to use (default: every category column of index.csv), e.g.
            ``["object", "part"]``.
        max_images: keep only the first this many images (after the split filter).
        split: keep only rows whose ``split`` is this (e.g. "train" or "val"); default all.
    """

    def __init__(self, root: str | Path, categories: Optional[Sequence[str]] = None,
                 max_images: Optional[int] = None, split: Optional[str] = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Broden folder {str(root)!r} does not exist; pass the unpacked folder (e.g. "
                                    f".../broden1_224); {LAYOUT}")
        for name in ("index.csv", "label.csv"):
            if not (root / name).is_file():
                nested = sorted(p.parent for p in root.glob(f"*/{name}"))
                hint = f"; found one in {nested[0]}, pass that folder" if nested else ""
                raise FileNotFoundError(f"{root / name} not found{hint}; {LAYOUT}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be positive, got {max_images}")
        self.root = root
        index_path, label_path = root / "index.csv", root / "label.csv"

        header, rows = _read_csv(index_path, INDEX_FIELDS)
        all_categories = [c for c in header if c not in INDEX_FIELDS]
        if categories is None:
            categories = all_categories
        elif isinstance(categories, str):
            categories = [categories]
        unknown = [c for c in categories if c not in all_categories]
        if unknown:
            plural = "ies" if len(unknown) > 1 else "y"
            raise ValueError(f"unknown Broden categor{plural} {', '.join(map(repr, unknown))}; "
                             f"index.csv has {', '.join(all_categories)}")
        if not categories:
            raise ValueError(f"no categories selected; index.csv has {', '.join(all_categories)}")
        self.categories = list(categories)

        # labels: concept columns in label-number order
        names, cats, numbers = [], [], []
        for line, row in _read_csv(label_path, LABEL_FIELDS)[1]:
            number = _int(row["number"], label_path, line, "number")
            if number == 0:
                continue
            listed = _parse_categories(row["category"], label_path, line)
            chosen = {c: n for c, n in listed.items() if c in self.categories}
            if not chosen:
                continue
            best = max(chosen.values())
            names.append((row["name"] or "").strip() or f"label{number}")
            cats.append(next(c for c, n in chosen.items() if n == best))
            numbers.append(number)
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"{label_path} lists a label number more than once")
        order = np.argsort(numbers, kind="stable")
        self.concept_names = [names[j] for j in order]
        self.concept_categories = [cats[j] for j in order]
        self.label_numbers = [numbers[j] for j in order]
        self._lut = np.full(max(self.label_numbers, default=0) + 1, -1, dtype=np.int64)
        self._lut[self.label_numbers] = np.arange(len(self.label_numbers))

        splits_seen = set()
        images = []
        for line, row in rows:
            if any(row.get(c) is None for c in INDEX_FIELDS) or None in row:
                raise ValueError(f"{index_path}, line {line}: expected {len(header)} cells ({','.join(header)}), "
                                 f"got a row of a different length")
            splits_seen.add(row["split"])
            if split is not None and row["split"] != split:
                continue
            pngs, labels = [], []
            for c in self.categories:
                for entry in filter(None, (e.strip() for e in (row[c] or "").split(";"))):
                    (labels.append(int(entry)) if entry.isdigit() else pngs.append(entry))
            if not row["image"].strip():
                raise ValueError(f"{index_path}, line {line}: empty image path")
            sh, sw = (_int(row[k], index_path, line, k) for k in ("sh", "sw"))
            for k in ("ih", "iw"):
                _int(row[k], index_path, line, k)
            if not (pngs or labels):
                continue
            images.append(_Image(row["image"].strip(), row["split"], sh, sw, pngs, labels))
            if max_images is not None and len(images) >= max_images:
                break
        if split is not None and not images and split not in splits_seen:
            raise ValueError(f"no images in split {split!r}; index.csv has splits {', '.join(sorted(splits_seen))}")
        if not images:
            raise ValueError(f"{index_path} has no images annotated in {', '.join(self.categories)}")
        self.images = images
        self._presence: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        path = self.root / "images" / self.images[i].path
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), -1
        except FileNotFoundError:
            raise FileNotFoundError(f"Broden image {path} listed in index.csv is missing") from None

    def mask_size(self, i: int) -> tuple[int, int]:
        """(sh, sw): the segmentation resolution of image i."""
        return self.images[i].sh, self.images[i].sw

    def _decode(self, rel: str, size: tuple[int, int]) -> np.ndarray:
        """Concept column per pixel of one segmentation PNG (-1: no selected concept)."""
        path = self.root / "images" / rel
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
        except FileNotFoundError:
            raise FileNotFoundError(f"Broden segmentation {path} listed in index.csv is missing") from None
        if rgb.shape[:2] != size:
            raise ValueError(f"segmentation {path} is {rgb.shape[1]}x{rgb.shape[0]} but index.csv gives "
                             f"sw x sh = {size[1]}x{size[0]}")
        number = rgb[..., 0] + 256 * rgb[..., 1]
        inside = number < len(self._lut)
        return np.where(inside, self._lut[np.where(inside, number, 0)], -1)

    def present_masks(self, i: int) -> tuple[Tensor, Tensor]:
        """(concept indices [m], bool masks [m, sh, sw]) of the concepts present in image i.

        Several PNGs of one image (e.g. part layers) are OR-ed per concept; image-level labels cover the
        whole mask.
        """
        record = self.images[i]
        size = (record.sh, record.sw)
        planes: dict[int, np.ndarray] = {}
        for rel in record.pngs:
            col = self._decode(rel, size)
            for c in np.unique(col):
                if c < 0:
                    continue
                m = col == c
                planes[int(c)] = planes[int(c)] | m if int(c) in planes else m
        for number in record.labels:
            c = int(self._lut[number]) if number < len(self._lut) else -1
            if c >= 0:
                planes[c] = np.ones(size, dtype=bool)
        idx = sorted(planes)
        masks = np.stack([planes[c] for c in idx]) if idx else np.zeros((0, *size), dtype=bool)
        return torch.tensor(idx, dtype=torch.long), torch.from_numpy(masks)

    def masks(self, i: int) -> Tensor:
        """Bool [M, sh, sw]: one plane per concept of ``concept_names``."""
        idx, present = self.present_masks(i)
        out = torch.zeros(len(self.concept_names), *self.mask_size(i), dtype=torch.bool)
        out[idx] = present
        return out

    def presence_matrix(self) -> Tensor:
        """Float [N, M]: 1 where a concept appears in an image. Decodes every PNG once (slow on all of
        Broden: minutes), then cached."""
        if self._presence is None:
            out = torch.zeros(len(self), len(self.concept_names))
            for i in range(len(self)):
                out[i, self.present_masks(i)[0]] = 1.0
            self._presence = out
        return self._presence
