"""Concept sets: the words a neuron can be labelled with.

``load_concept_set(spec)`` resolves, in this order:

- a built-in name: ``"20k"`` (the 20,000 most frequent English words, built offline from ``wordfreq`` by
  ``tools/build_concept_sets.py``; see ``concept_sets/20k.PROVENANCE.md``), ``"imagenet1k"`` (the 1000
  ImageNet class names in class-index order), ``"cifar10"``, ``"cifar100"``, ``"generated"`` (the concept
  names of :mod:`lwta_vision.datasets.shapes`);
- ``"broden:<folder>"``: the label names of a Broden dataset folder (its ``label.csv``);
- anything else is a path to a UTF-8 text file with one concept per line.

A built-in name wins over a file of the same name in the working directory; write ``./20k`` to force the
file. Built-in lists ship as text files inside the package, so no extra dependency is needed at runtime.
"""
from __future__ import annotations

import csv
import difflib
import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterable, Union

__all__ = [
    "BUILTIN_CONCEPT_SETS",
    "BRODEN_PREFIX",
    "load_broden_concepts",
    "load_concept_set",
    "read_concept_file",
]

_FILE_SETS = ("20k", "imagenet1k", "cifar10", "cifar100")
BUILTIN_CONCEPT_SETS: tuple[str, ...] = _FILE_SETS + ("generated",)
"""Names accepted by :func:`load_concept_set` besides ``broden:<folder>`` and text-file paths."""

BRODEN_PREFIX = "broden:"

# Broden marks scene labels with "-s" and colour labels with "-c" (e.g. "street-s", "red-c").
_BRODEN_CATEGORY_SUFFIX = re.compile(r"-[sc]$")
_UTF8_BOM = b"\xef\xbb\xbf"


def _dedupe(items: Iterable[str]) -> tuple[list[str], int]:
    seen: set[str] = set()
    out: list[str] = []
    dropped = 0
    for item in items:
        if item in seen:
            dropped += 1
            continue
        seen.add(item)
        out.append(item)
    return out, dropped


def _parse_concept_bytes(data: bytes, source: str) -> list[str]:
    """Decode UTF-8 text (one concept per line), strip, drop blanks and duplicates (warning on the latter)."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"concept file {source} looks binary (NUL byte at offset {nul}); "
            "expected a UTF-8 text file with one concept per line"
        )
    bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + bom
        raise ValueError(
            f"concept file {source} is not valid UTF-8 (byte 0x{data[offset]:02x} at offset {offset}); "
            "re-encode it to UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None
    lines = (line.strip() for line in text.splitlines())
    concepts, dropped = _dedupe(line for line in lines if line)
    if dropped:
        warnings.warn(
            f"concept file {source}: dropped {dropped} duplicate line(s), kept the first occurrence of each",
            stacklevel=3,
        )
    if not concepts:
        raise ValueError(f"concept file {source} has no concepts (it is empty or only blank lines)")
    return concepts


def read_concept_file(path: Union[str, os.PathLike]) -> list[str]:
    """Read a UTF-8 text file with one concept per line.

    Whitespace is stripped, blank lines skipped, and exact duplicates (case-sensitive, after stripping)
    dropped keeping the first occurrence, with a warning saying how many were dropped.

    Raises:
        ValueError: the file is missing, binary, not UTF-8 (the message gives the byte offset), or has
            no concepts.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"concept file {path} does not exist or is not a file")
    return _parse_concept_bytes(path.read_bytes(), str(path))


def _builtin_file(name: str) -> list[str]:
    resource = resources.files(__package__).joinpath("concept_sets", f"{name}.txt")
    return _parse_concept_bytes(resource.read_bytes(), f"<built-in {name}>")


def _generated_concepts() -> list[str]:
    try:
        from lwta_vision.datasets.shapes import CONCEPT_NAMES
    except ImportError as e:
        raise ImportError(
            f"concept set 'generated' needs lwta_vision.datasets.shapes.CONCEPT_NAMES, which failed to import: {e}"
        ) from e
    concepts, dropped = _dedupe(str(c).strip() for c in CONCEPT_NAMES)
    if dropped or not all(concepts):
        raise ValueError("lwta_vision.datasets.shapes.CONCEPT_NAMES must be unique, non-empty names")
    return concepts


def load_broden_concepts(root: Union[str, os.PathLike], clean: bool = True) -> list[str]:
    """Label names of a Broden dataset from ``<root>/label.csv``, in label-number order.

    ``label.csv`` has columns ``number,name,category,frequency,...``; the background row (number 0 or
    name ``-``) is skipped. With ``clean`` (default), names are made readable for a text encoder:
    underscores become spaces and Broden's category markers ``-s`` (scene) and ``-c`` (colour) are
    removed, so ``street-s`` -> ``street`` and ``red-c`` -> ``red``. Names that become identical (a scene
    and an object both called ``bridge``) are kept once, at their first position.
    """
    label_csv = Path(root) / "label.csv"
    if not label_csv.is_file():
        raise ValueError(
            f"Broden folder {root} has no label.csv (looked for {label_csv}); "
            f"pass '{BRODEN_PREFIX}<path to the folder holding index.csv and label.csv>'"
        )
    with open(label_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"number", "name"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{label_csv} lacks column(s) {sorted(missing)}; expected a header 'number,name,category,...'"
            )
        rows = []
        for row in reader:
            name = (row["name"] or "").strip()
            number = (row["number"] or "").strip()
            if not name or name == "-" or number in ("", "0"):
                continue
            rows.append((int(number), name))
    rows.sort(key=lambda r: r[0])
    names = [name for _, name in rows]
    if clean:
        names = [_BRODEN_CATEGORY_SUFFIX.sub("", n).replace("_", " ").strip() for n in names]
    concepts, _ = _dedupe(n for n in names if n)
    if not concepts:
        raise ValueError(f"{label_csv} lists no labels")
    return concepts


def load_concept_set(spec: Union[str, os.PathLike]) -> list[str]:
    """Return the concept names for a built-in name, ``broden:<folder>``, or a text-file path.

    Args:
        spec: one of :data:`BUILTIN_CONCEPT_SETS`, ``"broden:<path to Broden folder>"``, or a path to a
            UTF-8 text file with one concept per line.

    Raises:
        ValueError: unknown name / missing file (the message lists the built-in names), or a file that
            is binary, not UTF-8, or empty.
    """
    if isinstance(spec, str):
        if spec in _FILE_SETS:
            return _builtin_file(spec)
        if spec == "generated":
            return _generated_concepts()
        if spec.startswith(BRODEN_PREFIX):
            return load_broden_concepts(spec[len(BRODEN_PREFIX) :])
    path = Path(spec)
    if path.is_file():
        return read_concept_file(path)
    hint = ""
    if path.is_dir() and (path / "label.csv").is_file():
        hint = f" (it looks like a Broden folder: use '{BRODEN_PREFIX}{path}')"
    elif path.is_dir():
        hint = " (it is a folder; pass a text file)"
    else:
        close = difflib.get_close_matches(str(spec).lower(), BUILTIN_CONCEPT_SETS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else " (no such file)"
    raise ValueError(
        f"unknown concept set {str(spec)!r}{hint}; use a built-in name ({', '.join(BUILTIN_CONCEPT_SETS)}), "
        f"'{BRODEN_PREFIX}<path to a Broden folder>', or a path to a UTF-8 text file with one concept per line"
    )
