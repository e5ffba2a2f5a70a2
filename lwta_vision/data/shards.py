"""Convert an ImageFolder (ImageNet or any) into litdata shards for streaming.

    python -m lwta_vision.data.shards --src /data/imagenet --dst /data/imagenet-shards

writes, for each split, ``<dst>/<split>/`` with litdata's ``index.json`` and ``chunk-*.bin`` files (each item
is the image file's encoded bytes, as they were on disk, and its class index) and ``classes.json`` (the class
folder names and their readable names). :class:`~lwta_vision.data.streaming.StreamingImageDataModule` reads
them back from that folder or from an object store (copy the folder there: ``aws s3 sync``).

A split is written into a hidden temporary folder and renamed into place when complete, so an interrupted
conversion never leaves a folder that looks finished.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
from typing import Optional, Sequence, Union

from lwta_vision.data.imagenet import IMAGE_EXTENSIONS, class_folders, readable_class_names

CLASSES_FILE = "classes.json"
INSTALL_HINT = "pip install 'lwta_vision[stream]'"


class StreamingUnavailableError(ImportError, ValueError):
    """litdata is not installed (a ValueError too, so train.py reports it as one ``error:`` line)."""


def require_litdata():
    """Import litdata, or raise one error naming the install command."""
    try:
        import litdata
    except ImportError as e:
        raise StreamingUnavailableError(f"streaming shards need litdata, which is not installed ({e}); install it "
                                        f"with `{INSTALL_HINT}` (or `pip install litdata`)") from e
    return litdata


def list_image_folder(split_dir: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(path, class index), ...], class folders)`` of an ImageFolder split, in ImageFolder's order.

    Raises one clear error when the folder is missing, has no class folders, or a class folder has no image.
    """
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"{split_dir!r} does not exist; expected <src>/<split>/<class>/<image> (one folder "
                                f"per class, e.g. train/n01440764/*.JPEG)")
    folders = class_folders(split_dir)
    if not folders:
        raise FileNotFoundError(f"{split_dir!r} has no class folders; expected {split_dir}/<class>/<image>")
    items, empty = [], []
    for label, folder in enumerate(folders):
        found = []
        for root, dirs, files in os.walk(os.path.join(split_dir, folder), followlinks=True):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if not found:
            empty.append(folder)
        items += [(path, label) for path in found]
    if empty:
        shown = ", ".join(empty[:5]) + (f", ... ({len(empty)} in all)" if len(empty) > 5 else "")
        raise FileNotFoundError(f"class folder(s) {shown} in {split_dir!r} hold no image "
                                f"({', '.join(IMAGE_EXTENSIONS)}); fill them or remove them from every split")
    return items, folders


def _encode(item: tuple[str, int]) -> dict:
    """One shard item: the file's bytes, undecoded (JPEG stays JPEG), and its label. Runs in litdata workers."""
    path, label = item
    with open(path, "rb") as f:
        return {"image": f.read(), "label": int(label)}


def read_classes_file(path: str) -> dict:
    """The ``classes.json`` written beside a split's shards: ``{"classes": [...], "class_names": [...], ...}``."""
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("class_names"), list) or not meta["class_names"]:
        raise ValueError(f"{path} is not a shard classes file (no 'class_names' list); convert the split again with "
                         f"python -m lwta_vision.data.shards")
    return meta


def convert_image_folder(src: str, dst: str, split: str = "train", num_workers: Optional[int] = None,
                         chunk_bytes: Union[int, str] = "64MB", overwrite: bool = False,
                         verbose: bool = False, start_method: Optional[str] = None) -> str:
    """Write ``<src>/<split>/<class>/<image>`` as litdata shards in ``<dst>/<split>/``; returns that folder.

    Args:
        src: ImageFolder root holding ``<split>/``.
        dst: local folder that receives ``<split>/`` (copy it to an object store afterwards if wanted).
        split: the sub-folder of ``src`` to convert.
        num_workers: litdata worker processes (default: every CPU core).
        chunk_bytes: target size of one shard file (litdata's ``chunk_bytes``, e.g. "64MB" or an int).
        overwrite: replace existing shards of this split.
        verbose: litdata's progress output.
        start_method: how litdata starts its workers ("spawn", its default, or "fork": no re-import of
            torch per worker, which saves seconds on a small folder).
    """
    litdata = require_litdata()
    if "://" in str(dst):
        raise ValueError(f"--dst {dst!r} is a URL; convert to a local folder and copy it to the object store "
                         f"(e.g. aws s3 sync <dst> {dst}), then stream from the URL")
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source folder {src!r} does not exist; pass the ImageFolder root that holds "
                                f"{split}/<class>/<image> (for ImageNet, the folder with train/ and val/)")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    items, folders = list_image_folder(os.path.join(src, split))
    out = os.path.join(dst, split)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not overwrite:
            raise FileExistsError(f"{out!r} already exists and is not empty; pass --overwrite to replace the "
                                  f"{split} shards, or choose another --dst")
        if not os.path.isfile(os.path.join(out, "index.json")):
            raise FileExistsError(f"{out!r} holds files that are not litdata shards (no index.json); not "
                                  f"overwriting it: choose another --dst or empty it yourself")
    _check_other_splits(dst, split, folders)

    os.makedirs(dst, exist_ok=True)
    tmp = os.path.join(dst, f".{split}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    previous_start_method = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(fn=_encode, inputs=items, output_dir=tmp, chunk_bytes=chunk_bytes,
                         num_workers=min(num_workers or os.cpu_count() or 1, len(items)), verbose=verbose,
                         start_method=start_method)
        if not os.path.isfile(os.path.join(tmp, "index.json")):  # a worker died without litdata raising
            raise RuntimeError(f"litdata wrote no index.json for {split}: its worker processes failed (their "
                               f"errors are printed above with verbose=True, as the command line runs)")
        meta = {"split": split, "num_images": len(items), "classes": folders,
                "class_names": readable_class_names(folders), "source": os.path.abspath(src)}
        with open(os.path.join(tmp, CLASSES_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        old = os.path.join(dst, f".{split}.replaced-{os.getpid()}")
        if os.path.exists(out):  # --overwrite: move the old shards aside, put the new ones in place, then delete
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        # litdata.optimize sets the process-wide start method (to "spawn"); later DataLoaders in this process
        # (tests, notebooks) must not inherit it
        multiprocessing.set_start_method(previous_start_method, force=True)
    return out


def _check_other_splits(dst: str, split: str, folders: list[str]) -> None:
    """Fail before writing when shards of another split in ``dst`` have different classes."""
    if not os.path.isdir(dst):
        return
    for other in class_folders(dst):
        path = os.path.join(dst, other, CLASSES_FILE)
        if other == split or not os.path.isfile(path):
            continue
        theirs = read_classes_file(path).get("classes")
        if theirs != folders:
            raise ValueError(f"the {split} split has {len(folders)} class folders but the {other} shards in {dst!r} "
                             f"have {len(theirs or [])} different ones; labels are folder indices, so every split "
                             f"needs the same class folders (convert all splits from one source, or use another --dst)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m lwta_vision.data.shards``: bad input is one ``error: <message>`` line and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m lwta_vision.data.shards", allow_abbrev=False,
        description="Write the splits of an ImageFolder (e.g. ImageNet's train/ and val/) as litdata shards.")
    parser.add_argument("--src", required=True, help="ImageFolder root holding <split>/<class>/<image>")
    parser.add_argument("--dst", required=True, help="local output folder; receives <split>/ per split")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="sub-folders of --src to convert")
    parser.add_argument("--num_workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--chunk_bytes", default="64MB", help="target shard size, e.g. 64MB (default) or 256MB")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of a split")
    args = parser.parse_args(argv)
    chunk_bytes = int(args.chunk_bytes) if args.chunk_bytes.isdigit() else args.chunk_bytes
    try:
        for split in args.splits:
            out = convert_image_folder(args.src, args.dst, split, num_workers=args.num_workers,
                                       chunk_bytes=chunk_bytes, overwrite=args.overwrite, verbose=True)
            print(f"{split}: {read_classes_file(os.path.join(out, CLASSES_FILE))['num_images']} images -> {out}")
    except (ValueError, OSError, ImportError) as err:
        if os.environ.get("LWTA_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
