"""Build the concept-set files shipped in lwta_vision/dissect/concept_sets/ (run offline, once).

    python tools/build_concept_sets.py            # writes all sets and their provenance notes
    python tools/build_concept_sets.py --only 20k

- 20k.txt: ``wordfreq.top_n_list("en", n)`` filtered to ASCII alphabetic words, lower-cased,
  de-duplicated, first 20,000 in frequency order. Needs the ``wordfreq`` package (dev extra) only here;
  the library reads the shipped file.
- imagenet1k.txt: the CLIP-style readable ImageNet class names (OpenAI CLIP's curated list, as shipped in
  ``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``), class-index order, with its two duplicated names
  made unique (see IMAGENET_FIXES).
- cifar10.txt, cifar100.txt: the datasets' class names in label order, underscores as spaces.

Every file is written atomically (temp file + rename); each set gets a <name>.PROVENANCE.md beside it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import sys
import tempfile
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "lwta_vision" / "dissect" / "concept_sets"
COMMAND = "python tools/build_concept_sets.py"

WORDS_TARGET = 20_000

# CLIP's curated list gives two pairs of classes the same name; use WordNet's name for one of each pair.
IMAGENET_FIXES = {
    744: ("missile", "projectile"),  # n04008634 "projectile, missile" (657 is n03773504 "missile")
    836: ("sunglasses", "sunglass"),  # n04355933 "sunglass" (a burning lens); 837 is "sunglasses, dark glasses"
}

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

CIFAR100 = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; package data must be world-readable
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_set(name: str, concepts: list[str], provenance: str) -> None:
    assert len(set(concepts)) == len(concepts), f"{name}: duplicates"
    assert all(c and c == c.strip() and "\n" not in c for c in concepts), f"{name}: bad entries"
    body = "\n".join(concepts) + "\n"
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    _write_atomic(OUT_DIR / f"{name}.txt", body)
    today = _dt.date.today().isoformat()
    note = (
        f"# {name}.txt\n\n{provenance.strip()}\n\n"
        f"- Entries: {len(concepts)} (one per line, UTF-8, unique)\n"
        f"- SHA-256 of {name}.txt: `{digest}`\n"
        f"- Built: {today} with `{COMMAND} --only {name}` (Python {sys.version.split()[0]})\n"
    )
    _write_atomic(OUT_DIR / f"{name}.PROVENANCE.md", note)
    print(f"wrote {OUT_DIR / f'{name}.txt'}: {len(concepts)} concepts")


def build_20k() -> None:
    import wordfreq
    from importlib.metadata import version

    requested = 2 * WORDS_TARGET
    while True:
        raw = wordfreq.top_n_list("en", requested)
        seen: set[str] = set()
        words: list[str] = []
        for w in raw:
            w = w.lower()
            if w.isascii() and w.isalpha() and w not in seen:
                seen.add(w)
                words.append(w)
        if len(words) >= WORDS_TARGET or len(raw) < requested:
            break
        requested *= 2
    if len(words) < WORDS_TARGET:
        raise SystemExit(f"wordfreq gave only {len(words)} usable words")
    words = words[:WORDS_TARGET]
    _write_set(
        "20k",
        words,
        f"""
The {WORDS_TARGET:,} most frequent English words: our stand-in for CLIP-Dissect's default "20k" concept
set (theirs is a different list of common words), built from word-frequency data with a known licence.

- Source: Python package `wordfreq` {version("wordfreq")} (data: Robyn Speer et al., CC-BY-SA 4.0;
  see https://github.com/rspeer/wordfreq), call `wordfreq.top_n_list("en", {requested})`
  (frequency order, already lower-cased by wordfreq).
- Filters, in order: lower-case; keep a word only if `str.isascii()` and `str.isalpha()` (drops
  numbers, contractions, hyphenated and accented words); drop repeats keeping the first (most
  frequent) occurrence; keep the first {WORDS_TARGET:,}.
- Not removed: function words ("the", "of") and proper nouns that wordfreq lower-cases; they simply
  rarely win a neuron's label under soft-WPMI.
""",
    )


def build_imagenet1k() -> None:
    from importlib.metadata import version

    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = [str(n).strip() for n in IMAGENET_CLASSNAMES]
    if len(names) != 1000:
        raise SystemExit(f"expected 1000 ImageNet class names, got {len(names)}")
    for index, (old, new) in IMAGENET_FIXES.items():
        if names[index] != old:
            raise SystemExit(f"unexpected ImageNet name at {index}: {names[index]!r} (expected {old!r})")
        names[index] = new
    fixes = "\n".join(f"  - class {i}: `{old}` -> `{new}`" for i, (old, new) in IMAGENET_FIXES.items())
    _write_set(
        "imagenet1k",
        names,
        f"""
The 1000 ImageNet-1k (ILSVRC-2012) class names in class-index order (line i = class i), in the readable
form OpenAI curated for CLIP zero-shot classification (e.g. `crane bird` / `construction crane` instead
of WordNet's two `crane`s, `tights` / `one-piece bathing suit` instead of two `maillot`s).

- Source: `open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES` from `open_clip_torch` {version("open_clip_torch")}
  (MIT licence), originally from OpenAI's CLIP "Prompt Engineering for ImageNet" notebook.
- That list gives two pairs of classes the same name; for one class of each pair we use WordNet's own
  name instead, so every line is unique:
{fixes}
""",
    )


def build_cifar() -> None:
    _write_set(
        "cifar10",
        CIFAR10,
        "CIFAR-10 class names in label order (Krizhevsky 2009; `batches.meta` `label_names`).",
    )
    _write_set(
        "cifar100",
        [n.replace("_", " ") for n in CIFAR100],
        "CIFAR-100 fine class names in label order (Krizhevsky 2009; `meta` `fine_label_names`), with "
        "underscores replaced by spaces (`aquarium_fish` -> `aquarium fish`).",
    )


BUILDERS = {"20k": build_20k, "imagenet1k": build_imagenet1k, "cifar10": build_cifar, "cifar100": build_cifar}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append", help="build only these sets")
    args = parser.parse_args(argv)
    done = set()
    for name in args.only or list(BUILDERS):
        builder = BUILDERS[name]
        if builder not in done:
            builder()
            done.add(builder)


if __name__ == "__main__":
    main()
