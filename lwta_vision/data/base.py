"""The base LightningDataModule: splits, transforms, loaders and probe sets shared by every dataset.

Every dataset module supplies *raw* splits whose items are ``(PIL image, label)``; this base puts the
transforms on separate views of them. Keeping raw data and transforms apart is what lets the same images
serve training (augmented), validation (eval transform only) and dissection (untouched, so CLIP and the
HTML report can apply their own preprocessing).
"""
from __future__ import annotations

from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T

from lwta_vision.datasets.arrays import ArrayImageDataset, TransformedView  # noqa: F401  (documented here)
from lwta_vision.datasets.probe import ProbeSet

SPLITS = ("train", "val", "test")


def unrepeated_eval_sampler(dataset: Dataset, trainer: Optional["L.Trainer"]) -> Optional[Sampler]:
    """Under multi-process training, a sampler that gives each rank a disjoint, unpadded slice of an eval split.

    Lightning's default (``DistributedSampler``) pads the split with repeated images until it divides by the
    number of ranks, so ``val/acc`` under DDP would count some images twice and differ from one process.
    This one does not repeat; ranks may run one batch more or less, which is safe for evaluation (no gradient
    sync; DDP syncs buffers on the first batch only, and metrics sync once at the epoch end). ``None``
    (Lightning's default) on one process, or when the split has fewer images than ranks (every rank must run
    at least one batch).
    """
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    # Trainer(use_distributed_sampler=False): the user shards the data; keep out of it (no public accessor)
    wanted = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
    if world <= 1 or not wanted or len(dataset) < world:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)


class EpochShuffleSampler(DistributedSampler):
    """Shuffled training indices whose order is a pure function of ``(seed, epoch)``, with its position as state.

    Why not ``shuffle=True``: a RandomSampler draws each epoch's permutation from a generator whose state after
    a resume is not the one it had, so the batches after a mid-epoch (or even epoch-boundary) resume differ from
    an uninterrupted run's. Here epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``(seed,
    e)``; Lightning calls :meth:`set_epoch` each epoch, and ``state_dict``/``load_state_dict`` (which torchdata's
    StatefulDataLoader saves into every checkpoint) hold the epoch and how many indices were given out, so a
    resumed run continues with exactly the batches it would have seen. Under DDP each rank takes its shard of
    the same permutation, padded as ``DistributedSampler`` pads; being a DistributedSampler, Lightning keeps it
    instead of wrapping it in one.
    """

    ORDER_VERSION = 2
    """Bump when the same (seed, epoch) gives another order (1: the RandomSampler before this class). Results are
    stamped with it (``lwta_vision.provenance``): every trained network changes with the order."""

    def __init__(self, num_samples: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(int(num_samples)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed))
        self.size = int(num_samples)
        self._start, self._yielded = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start = int(epoch), 0

    def __iter__(self):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        order = torch.randperm(self.size, generator=g).tolist()
        order += order[: self.total_size - len(order)]  # pad as DistributedSampler does (a no-op on one process)
        mine = order[self.rank: self.total_size: self.num_replicas]
        start, self._start = self._start, 0  # a restored position applies to the next iteration only
        self._yielded = start
        for i in mine[start:]:
            self._yielded += 1
            yield i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self._yielded, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._start = int(state["epoch"]), int(state["yielded"])


def shuffle_seed(seed: int) -> int:
    """The training shuffle's seed: the run's global seed (``seed_everything``, the same on every DDP rank)
    mixed with the data seed."""
    import os

    return int(np.random.SeedSequence([int(os.environ.get("PL_GLOBAL_SEED", 0)) % 2**63, int(seed)]).generate_state(1)[0])


def held_out_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted ``(train_indices, val_indices)``; the same ``(n, val_fraction, seed)`` gives the same split."""
    n_val = int(round(n * val_fraction))
    if not 0 < n_val < n:
        raise ValueError(f"val_fraction={val_fraction} of {n} training images leaves an empty split; "
                         f"set data.init_args.val_fraction so that both splits get at least one image")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


class VisionDataModule(L.LightningDataModule):
    """Shared machinery of the image-classification DataModules.

    Subclasses set the class attributes below and implement :meth:`_load_raw_splits`; they may add
    augmentations in :meth:`_augmentation`. The class attributes are available right after ``__init__``
    (before any data is read) because LightningCLI links them into the model at instantiation.

    Args:
        data_dir: where the dataset lives (or is downloaded to).
        batch_size: images per batch for every loader.
        num_workers: DataLoader worker processes.
        val_fraction: fraction of the training set held out for validation, for datasets without an
            official validation split; ``None`` for datasets that have one.
        seed: seeds the held-out split, so it is the same on every run and every rank.
        augment: apply the dataset's training augmentation (validation and test never get any).
        pin_memory: pin host memory in the loaders (helps GPU training).
    """

    name: str = "dataset"
    num_classes: int
    class_names: list[str]
    in_channels: int = 3
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, data_dir: Optional[str], batch_size: int = 128, num_workers: int = 2,
                 val_fraction: Optional[float] = 0.1, seed: int = 0, augment: bool = True,
                 pin_memory: bool = False):
        super().__init__()
        # every subclass's init args (Lightning collects them up the __init__ chain): checkpoints record them,
        # so dissect.py can rebuild the probe set of a run whose config.yaml is gone
        self.save_hyperparameters()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}; set data.init_args.batch_size")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}; set data.init_args.num_workers")
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; "
                             f"set data.init_args.val_fraction")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment
        self.pin_memory = pin_memory
        self._raw: Optional[dict[str, tuple[Dataset, Optional[list[int]]]]] = None

    # ----------------------------------------------------------------------------------- subclass hooks
    def _load_raw_splits(self) -> dict[str, Dataset]:
        """Raw ``(PIL image, label)`` datasets keyed "train" and "test", plus "val" if the dataset has one."""
        raise NotImplementedError

    def _augmentation(self) -> list[Callable]:
        """PIL -> PIL training augmentations, applied before the eval transform."""
        return []

    # ------------------------------------------------------------------------------------- transforms
    @property
    def eval_transform(self) -> Callable:
        """PIL image -> normalised float tensor, as the network sees it at evaluation."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    @property
    def train_transform(self) -> Callable:
        """Augmentation (when ``augment``) followed by the eval transform."""
        if not self.augment:
            return self.eval_transform
        return T.Compose([*self._augmentation(), T.ToTensor(), T.Normalize(self.mean, self.std)])

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        """Read every split once (they are small); later calls are no-ops."""
        if self._raw is not None:
            return
        raw = self._load_raw_splits()
        if "val" in raw:
            self._raw = {split: (raw[split], None) for split in SPLITS}
        else:
            if self.val_fraction is None:
                raise ValueError(f"{type(self).__name__} has no validation split; "
                                 f"set data.init_args.val_fraction")
            train_idx, val_idx = held_out_split(len(raw["train"]), self.val_fraction, self.seed)
            self._raw = {"train": (raw["train"], train_idx), "val": (raw["train"], val_idx),
                         "test": (raw["test"], None)}

    def _ensure_setup(self) -> None:
        # Lightning calls prepare_data/setup before the loaders; scripts and callbacks that use the
        # DataModule on its own should not have to remember to.
        if self._raw is None:
            self.prepare_data()
            self.setup()

    def _view(self, split: str, transform: Optional[Callable]) -> Dataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self._ensure_setup()
        dataset, indices = self._raw[split]
        if indices is None and transform is None:
            return dataset
        return TransformedView(dataset, indices, transform)

    def dataset(self, split: str) -> Dataset:
        """The split as the network sees it: augmented for "train", eval transform otherwise."""
        return self._view(split, self.train_transform if split == "train" else self.eval_transform)

    # ------------------------------------------------------------------------------------ dataloaders
    def _loader(self, split: str) -> DataLoader:
        # No implicit setup here: LightningDataModule.__str__ calls the loader methods, and printing a
        # DataModule must not read or download a dataset.
        if self._raw is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run; call prepare_data() and setup() "
                               f"first (the Trainer does this for you)")
        dataset = self.dataset(split)
        if split == "train":
            # resumable anywhere: Lightning saves a StatefulDataLoader's state (with the sampler's position) in
            # every checkpoint, and the sampler's order depends only on (seed, epoch)
            from torchdata.stateful_dataloader import StatefulDataLoader

            seed = shuffle_seed(self.seed)
            world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
            rank = getattr(self.trainer, "global_rank", 0) if self.trainer is not None else 0
            wanted = getattr(getattr(self.trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
            sampler = EpochShuffleSampler(len(dataset), seed, world if wanted else 1, rank if wanted else 0)
            # its own generator for the workers' base seed: drawn from the global one, creating an iterator would
            # shift the LWTA noise of a resumed run by one draw
            return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                                      num_workers=self.num_workers, pin_memory=self.pin_memory,
                                      persistent_workers=self.num_workers > 0,
                                      generator=torch.Generator().manual_seed(seed))
        sampler = unrepeated_eval_sampler(dataset, self.trainer)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """``train.py predict`` runs on the test split (class probabilities per image)."""
        return self._loader("test")

    # ------------------------------------------------------------------------------------ dissection
    def probe_dataset(self, split: str = "val") -> Dataset:
        """Raw ``(PIL image, label)`` items of a split: no augmentation, no normalisation."""
        return self._view(split, None)

    def probe_set(self, split: str = "val") -> ProbeSet:
        """The split as a :class:`ProbeSet`, carrying this DataModule's eval transform."""
        return ProbeSet(self.probe_dataset(split), self.eval_transform, name=f"{self.name}-{split}",
                        grayscale=self.in_channels == 1)
