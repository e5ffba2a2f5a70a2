"""Stream image shards written by ``python -m lwta_vision.data.shards`` (litdata) from disk or an object store.

Training streams the shards with litdata's ``StreamingDataset`` and ``StreamingDataLoader``: chunks are
fetched ahead of use (and cached locally for URLs), shuffled (chunk order and items within chunks, reseeded
every epoch), and under DDP each rank reads its own share of the chunks (litdata reads the rank), so the
Trainer adds no sampler. Evaluation, dissection and ``dataset(split)`` read the same shards by index
(litdata fetches the chunk an index falls in): validation gives each rank one contiguous slice, so every image
is counted exactly once and each rank reads only its own chunks.
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Callable, Optional

from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lwta_vision.data.base import VisionDataModule
from lwta_vision.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetPipelines,
    eval_resize,
    imagenet_class_names,
    imagenet_wnids,
)
from lwta_vision.data.shards import CLASSES_FILE, read_classes_file, require_litdata


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts]) if _is_url(root) else os.path.join(root, *parts)


# the boto3 client config for s3:// shards (index.json, classes.json, evaluation's reads by index); keys given in
# storage_options["config"] replace these. Bounded, so a store that is down is an error within seconds (refused)
# or about 100 s (no answer: 5 attempts x read_timeout) where litdata's own default, 1000 adaptive retries, waits
# for hours. max_attempts counts the retries after the first request.
S3_CLIENT_CONFIG = {"connect_timeout": 10, "read_timeout": 20, "retries": {"max_attempts": 4, "mode": "standard"}}


class ObjectStoreError(ConnectionError, ValueError):
    """The object store holding the shards cannot be read (a ValueError too: train.py shows one ``error:`` line)."""


def litdata_storage_options(data_dir: str, storage_options: Optional[dict]) -> dict:
    """``storage_options`` as litdata needs them; for ``s3://`` they are boto3's ``client("s3", **options)``.

    For S3 the ``config`` entry may be a dict (a YAML config cannot hold a ``botocore.config.Config``): it is
    merged over :data:`S3_CLIENT_CONFIG` and turned into the Config object. An ``http://`` endpoint is allowed for
    the chunk downloads too (see :func:`_allow_http_chunk_downloads`). Other schemes get the options unchanged.
    """
    options = dict(storage_options or {})
    if not str(data_dir).startswith("s3://"):
        return options
    import botocore.config

    config = options.get("config")
    if not isinstance(config, botocore.config.Config):
        defaults = dict(S3_CLIENT_CONFIG)
        if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
            defaults.pop("retries")  # the user's retry settings in the environment win over our default
        merged = {**defaults, **dict(config or {})}
        unknown = sorted(set(merged) - set(botocore.config.Config.OPTION_DEFAULTS))
        if unknown:
            raise ValueError(f"storage_options.config has unknown key(s) {', '.join(unknown)}; it takes the "
                             f"arguments of botocore.config.Config, e.g. connect_timeout, read_timeout, retries")
        options["config"] = botocore.config.Config(**merged)
    endpoint = options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    if str(endpoint or "").startswith("http://"):
        os.environ["AWS_ALLOW_HTTP"] = "true"  # read again by DataLoader workers started with "spawn"
        _allow_http_chunk_downloads()
    return options


def _allow_http_chunk_downloads() -> None:
    """Let litdata's obstore chunk downloads use an ``http://`` endpoint (MinIO, moto, a local gateway).

    litdata 0.2.76 fetches chunks with obstore, whose client refuses plain http unless ``allow_http`` is set,
    and it builds that client from fixed options that shadow obstore's own ``AWS_ALLOW_HTTP`` variable; without
    this every chunk GET fails with "HTTP error: builder error". Applied when ``AWS_ALLOW_HTTP`` is true.
    """
    try:
        from litdata.streaming import downloader
    except ImportError:
        return
    client_options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(client_options, dict):
        client_options["allow_http"] = True


if os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true":  # a "spawn" DataLoader worker imports this module
    _allow_http_chunk_downloads()


def _endpoint(options: dict) -> str:
    """Where an S3 client sends requests, for error messages."""
    endpoint = options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    return f" at {endpoint}" if endpoint else ""


def _missing_object(err: BaseException) -> bool:
    """True when the store answered that the object or bucket does not exist (not a network or auth failure)."""
    response = getattr(err, "response", None)  # botocore's ClientError: {"Error": {"Code": "NoSuchKey", ...}}
    code = str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return (code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") or isinstance(err, FileNotFoundError)
            or type(err).__name__ == "NotFound")  # google.api_core's


def _remove_stale_downloads(cache: Optional[str]) -> None:
    """Delete partial chunk downloads, litdata's ``<chunk>.tmp.<pid>``, whose process is gone.

    litdata downloads a chunk to that name and renames it when complete, so a partial chunk is never read; but one
    left by a killed run (or by a download abandoned when another failed) stays and counts against max_cache_size.
    A live process's download is left alone (the ranks of one node share the cache).
    """
    if os.name != "posix" or not cache or not os.path.isdir(cache):
        return
    for name in os.listdir(cache):
        _, tmp, pid = name.rpartition(".tmp.")
        if not tmp or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            try:
                os.remove(os.path.join(cache, name))
            except OSError:
                pass
        except OSError:  # alive, someone else's
            pass


class DecodeItem:
    """Shard item ``{"image": bytes, "label": int}`` -> ``(transform(RGB PIL image), label)``.

    A module-level class (not a lambda) so DataLoader workers started with "spawn" can pickle it.
    """

    def __init__(self, transform: Optional[Callable] = None):
        self.transform = transform

    def __call__(self, item: dict) -> tuple[Any, int]:
        with Image.open(io.BytesIO(item["image"])) as img:
            image = img.convert("RGB")
        return (image if self.transform is None else self.transform(image)), int(item["label"])


class ShardImages(Dataset):
    """Random access to a split's shards as raw ``(PIL image, label)`` items (for probe sets and views).

    ``len`` is the whole split on every rank (litdata's own ``len`` is the rank's share).
    """

    def __init__(self, stream):
        self.stream = stream
        self._len = sum(end - start for start, end in stream.region_of_interest)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} images")
        return self.stream[int(i)]


class StreamingImageDataModule(ImageNetPipelines, VisionDataModule):
    """Image classification from litdata shards: ``<data_dir>/train/`` and ``<data_dir>/val/``.

    Write the shards with ``python -m lwta_vision.data.shards --src /data/imagenet --dst <data_dir>``; each
    split folder holds litdata's ``index.json`` and chunks, and ``classes.json`` with the class names.
    ``data_dir`` is a local folder or an object-store URL (``s3://bucket/imagenet-shards``,
    ``gs://...``; credentials as litdata/boto3 read them, or ``storage_options``). Transforms are the ImageNet
    ones (RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation); "test" is the val split.

    Class names are read from ``train/classes.json`` when the DataModule is created; if it is not there yet
    they default to the 1000 ImageNet classes (so a config builds before the data exists) and the missing
    shards are reported at setup.

    Args:
        data_dir: folder or URL holding ``train/`` and ``val/`` shards.
        image_size: side of the square crops the network sees (224).
        resize: eval resize of the shorter side (default ``round(image_size / 0.875)``, 256 for 224).
        cache_dir: where litdata caches chunks streamed from a URL (default: litdata's own).
        max_cache_size: cap on that cache, e.g. "100GB" (litdata's units: KB/MB/GB are powers of 1000); the
            cache can pass it by about one chunk while a chunk is being replaced.
        storage_options: for ``s3://``, keyword arguments of boto3's ``client("s3", ...)``: ``endpoint_url`` for
            an S3-compatible store (MinIO, Ceph; ``http://`` works too), ``region_name``, and ``config``, a dict
            of ``botocore.config.Config`` arguments merged over :data:`S3_CLIENT_CONFIG` (timeouts, bounded
            retries). Keep secrets out of it (it is saved in config.yaml and checkpoints): boto3 reads
            ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` and ``~/.aws``. Other schemes: passed to litdata.
        batch_size, num_workers, seed, augment, pin_memory: see :class:`VisionDataModule`; ``seed`` seeds
            the shuffle of the training shards.
    """

    name = "shards"
    in_channels = 3
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, data_dir: str, image_size: int = 224, resize: Optional[int] = None, batch_size: int = 256,
                 num_workers: int = 8, seed: int = 0, augment: bool = True, pin_memory: bool = False,
                 cache_dir: Optional[str] = None, max_cache_size: str = "100GB",
                 storage_options: Optional[dict] = None):
        super().__init__(data_dir, batch_size=batch_size, num_workers=num_workers, val_fraction=None, seed=seed,
                         augment=augment, pin_memory=pin_memory)
        require_litdata()
        self.image_size, self.resize = image_size, eval_resize(image_size, resize)
        self.cache_dir, self.max_cache_size = cache_dir, max_cache_size
        self.storage_options = dict(storage_options or {})
        self._litdata_options = litdata_storage_options(data_dir, self.storage_options)
        try:
            meta = self._read_meta("train")
            self.folder_names, self.class_names = list(meta["classes"]), list(meta["class_names"])
        except (OSError, ValueError):  # reported by setup(), where the Trainer shows it
            self.folder_names, self.class_names = list(imagenet_wnids()), list(imagenet_class_names())
        self.num_classes = len(self.class_names)

    # -------------------------------------------------------------------------------------- the shards
    def _not_found(self, split: str, why: str) -> FileNotFoundError:
        write = (f"Write them with `python -m lwta_vision.data.shards --src /path/to/imagefolder --dst "
                 f"{self.data_dir}` (it creates train/ and val/ there)")
        if _is_url(self.data_dir):  # the converter writes to a local folder only
            sync = f" (`aws s3 sync /path/to/shards {self.data_dir}`)" if self.data_dir.startswith("s3://") else ""
            write = (f"Write them with `python -m lwta_vision.data.shards --src /path/to/imagefolder --dst "
                     f"/path/to/shards` and copy that folder there{sync}")
        return FileNotFoundError(f"no {split} shards in {_join(self.data_dir, split)!r} ({why}). {write}, or point "
                                 f"data.init_args.data_dir at the folder or URL that holds them")

    def _read_meta(self, split: str) -> dict:
        """``<data_dir>/<split>/classes.json``, fetched with litdata's downloader when ``data_dir`` is a URL."""
        path = _join(self.data_dir, split, CLASSES_FILE)
        if not _is_url(self.data_dir):
            if not os.path.isfile(path):
                raise self._not_found(split, f"{CLASSES_FILE} missing")
            return read_classes_file(path)
        from litdata.streaming.downloader import Downloader, get_downloader

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, CLASSES_FILE)
            try:
                downloader = get_downloader(_join(self.data_dir, split), tmp, [], self._litdata_options)
                if type(downloader).download_fileobj is not Downloader.download_fileobj:
                    # the SDK client: litdata's download_file would use obstore, whose runtime must not start in
                    # this process before DataLoader workers fork (litdata keeps it to chunk downloads)
                    with open(local, "wb") as f:
                        downloader.download_fileobj(path, f)
                else:
                    downloader.download_file(path, local)
            except Exception as e:  # one message naming the URL: no such object, or a store that cannot be read
                raise self._store_error(split, path, e) from e
            return read_classes_file(local)

    def _store_error(self, split: str, path: str, err: Exception) -> Exception:
        """The error to raise when fetching ``path`` failed: shards not there, or a store that cannot be read."""
        why = f"cannot fetch {path}: {type(err).__name__}: {err}"
        if _missing_object(err):
            return self._not_found(split, why)
        return ObjectStoreError(
            f"cannot read the {split} shards from the object store{_endpoint(self._litdata_options)} ({why}). Check "
            f"that the store is up and reachable, data.init_args.storage_options (endpoint_url) and the credentials; "
            f"timeouts and retries: storage_options.config")

    def _stream(self, split: str, transform: Optional[Callable], shuffle: bool = False):
        litdata = require_litdata()
        folder = _join(self.data_dir, "val" if split == "test" else split)
        try:  # fetches index.json
            stream = litdata.StreamingDataset(folder, shuffle=shuffle, seed=self.seed,
                                              transform=DecodeItem(transform), cache_dir=self.cache_dir,
                                              max_cache_size=self.max_cache_size,
                                              storage_options=self._litdata_options)
        except Exception as e:
            if not type(e).__module__.startswith(("botocore", "boto3", "obstore")):  # not the storage clients'
                raise
            path = _join(folder, "index.json")
            if _missing_object(e):  # setup() adds how to write the shards
                raise FileNotFoundError(f"cannot fetch {path}: {type(e).__name__}: {e}") from e
            raise self._store_error(split, path, e) from e
        if _is_url(self.data_dir):
            _remove_stale_downloads(stream.input_dir.path)
        return stream

    def prepare_data(self) -> None:
        """Nothing to fetch: shards are streamed."""

    def setup(self, stage: Optional[str] = None) -> None:
        """Check both splits' class lists; later calls are no-ops."""
        if self._raw is not None:
            return
        train, val = self._read_meta("train"), self._read_meta("val")
        if train.get("classes") != val.get("classes"):
            raise ValueError(f"the train and val shards in {self.data_dir!r} have different classes "
                             f"({len(train['class_names'])} vs {len(val['class_names'])}); convert both splits "
                             f"from the same ImageFolder")
        if list(train["class_names"]) != self.class_names:
            raise ValueError(f"{_join(self.data_dir, 'train', CLASSES_FILE)} changed after the DataModule was "
                             f"created ({len(self.class_names)} classes then, {len(train['class_names'])} now); "
                             f"create it again so the model gets the right classes")
        try:
            val_images = ShardImages(self._stream("val", None, shuffle=False))
            self._raw = {"train": (ShardImages(self._stream("train", None, shuffle=False)), None),
                         "val": (val_images, None), "test": (val_images, None)}
        except ObjectStoreError:
            raise
        except (FileNotFoundError, ValueError) as e:  # classes.json without litdata's index.json beside it
            raise self._not_found("train or val", f"{type(e).__name__}: {e}") from e

    def _loader(self, split: str):
        if self._raw is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run; call setup() first (the Trainer "
                               f"does this for you)")
        if split != "train":
            return self._eval_loader(split)
        from litdata import StreamingDataLoader

        # made here, after the Trainer has started DDP, so litdata sees the rank and world size; drop_last is
        # litdata's (True under DDP: every rank runs the same number of steps)
        stream = self._stream(split, self.train_transform, shuffle=True)
        return StreamingDataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers,
                                   pin_memory=self.pin_memory)

    def _eval_loader(self, split: str) -> DataLoader:
        """Every image exactly once, in stored order: rank r reads the r-th contiguous slice of the shards.

        litdata's own split of a stream gives each rank whole batches and the last rank the remainder, so a
        rank can get no batch at all (a 500-image val set, batch 256, 2 GPUs), which Lightning rejects.
        """
        dataset = self.dataset(split)
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        sampler = None
        if world > 1 and len(dataset) >= world:
            sampler = ContiguousShardSampler(dataset, num_replicas=world, rank=self.trainer.global_rank)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)


class ContiguousShardSampler(DistributedSampler):
    """Rank r of w reads indices ``[r*n//w, (r+1)*n//w)``: no image twice or dropped, and sequential reads.

    A ``DistributedSampler`` so that Lightning keeps it (it would otherwise shard a custom sampler again).
    Ranks differ by at most one image, which is safe for evaluation (no gradient synchronisation).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        n = len(dataset)
        self.start, self.stop = rank * n // num_replicas, (rank + 1) * n // num_replicas
        self.num_samples, self.total_size = self.stop - self.start, n

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples
