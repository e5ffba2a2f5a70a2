"""Tests for lwta_vision.data: generated concept data, CIFAR and Fashion-MNIST on tiny fixture files."""
import gzip
import os
import pickle
import struct
import time
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from lwta_vision.data import ConceptDataModule, ShapesConceptDataset, VisionDataModule
from lwta_vision.data.base import held_out_split
from lwta_vision.data.cifar import CIFAR100_CLASSES, CIFAR10DataModule, CIFAR100DataModule
from lwta_vision.data.fashion_mnist import (
    DEBIAN_DIR,
    FASHION_MNIST_FILES,
    FashionMNISTDataModule,
    find_fashion_mnist_files,
    read_idx,
)
from lwta_vision.data.generated import _PALETTE, COLOURS, SHAPES, render_scene
from lwta_vision.datasets.probe import ProbeSet


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


# ------------------------------------------------------------------------------------------ generated
@pytest.fixture(scope="module")
def shapes64():
    return ShapesConceptDataset(num_samples=300, image_size=64, seed=0)


def test_concept_vocabulary():
    ds = ShapesConceptDataset(num_samples=1)
    names, cats = ds.concept_names, ds.concept_categories
    assert len(names) == len(set(names)) == len(cats)
    assert names[:6] == ["circle", "square", "triangle", "star", "cross", "ring"] == ds.class_names
    assert cats.count("shape") >= 6 and cats.count("colour") >= 8 and cats.count("texture") >= 4
    assert [n for n, c in zip(names, cats) if c == "texture"][:4] == ["plain", "stripes", "dots", "checkerboard"]
    assert cats == sorted(cats, key=["shape", "colour", "texture"].index)
    # named colours are well separated
    rgb = _PALETTE[: len(COLOURS)].astype(int)
    dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + np.eye(len(rgb)) * 1e3
    assert dist.min() > 80


def test_sample_is_pure_function_of_seed_split_and_index():
    a = ShapesConceptDataset(num_samples=50, seed=3)
    b = ShapesConceptDataset(num_samples=50, seed=3)
    order = [b.sample(i) for i in (7, 2, 30)]  # different order, different instance
    for i, s in zip((7, 2, 30), order):
        t = a.sample(i)
        assert np.array_equal(s["image"], t["image"]) and np.array_equal(s["masks"], t["masks"])
        assert s["label"] == t["label"]
    other_seed = ShapesConceptDataset(num_samples=50, seed=4).sample(7)["image"]
    other_split = ShapesConceptDataset(num_samples=50, seed=3, split="val").sample(7)["image"]
    assert not np.array_equal(other_seed, a.sample(7)["image"])
    assert not np.array_equal(other_split, a.sample(7)["image"])


def test_sample_structure_and_masks(shapes64):
    m = len(shapes64.concept_names)
    for i in range(40):
        s = shapes64.sample(i)
        img, masks = s["image"], s["masks"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert masks.shape == (m, 64, 64) and masks.dtype == np.bool_
        assert s["presence"].dtype == np.float32
        assert np.array_equal(s["presence"], masks.reshape(m, -1).any(1).astype(np.float32))
        shape_m, colour_m, tex_m = masks[:6], masks[6:14], masks[14:]
        assert shape_m.sum(0).max() <= 1  # a pixel shows at most one shape
        assert shape_m[s["label"]].any()
        for c in range(len(COLOURS)):  # colour masks are exactly the pixels of that colour
            assert np.array_equal(colour_m[c], (img == _PALETTE[c]).all(-1))
        assert tex_m.sum() == 64 * 64 and tex_m.any((1, 2)).sum() == 1  # one texture, whole image
        # shape pixels are coloured, never the neutral base
        assert colour_m.any(0)[shape_m.any(0)].all()


def test_label_is_largest_object_and_shapes_avoid_texture_colour():
    for size in (64, 32):
        for i in range(150):
            scene = render_scene(np.random.default_rng([1, i]), size)
            objects, colours = scene["objects"], scene["colours"]
            visible = np.bincount(objects.ravel() + 1, minlength=len(scene["shapes"]) + 1)[1:]
            assert scene["shapes"][0] == scene["label"]
            if len(visible) > 1:
                assert visible[0] >= 1.3 * visible[1:].max()
            object_colours = set(np.unique(colours[objects >= 0]).tolist())
            background = set(np.unique(colours[objects < 0]).tolist()) - {len(COLOURS), len(COLOURS) + 1}
            assert not object_colours & background
            assert len(object_colours) == len(visible)  # distinct colours per object


def test_largest_object_size_scale(shapes64):
    radii = []
    for i in range(60):
        s = shapes64.sample(i)
        area = s["masks"][s["label"]].sum()
        radii.append(np.sqrt(area / np.pi))  # radius of the circle of equal area
    assert 10 <= min(radii) and max(radii) <= 24


def test_presence_matrix_cached_and_consistent(shapes64):
    p = shapes64.presence_matrix()
    assert p.shape == (300, len(shapes64.concept_names)) and p.dtype == torch.float32
    assert shapes64.presence_matrix() is p
    for i in (0, 17, 299):
        assert torch.equal(p[i], torch.from_numpy(shapes64.sample(i)["presence"]))
    assert (p.sum(0) > 0).all(), "every concept appears somewhere"
    assert torch.equal(p[:, 14:].sum(1), torch.ones(300))
    counts = torch.bincount(shapes64.labels, minlength=6)
    assert counts.min() > 20  # classes roughly balanced


def test_getitem_pil_and_transform(shapes64):
    img, label = shapes64[5]
    assert isinstance(img, Image.Image) and img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), shapes64.sample(5)["image"]) and label == shapes64.sample(5)["label"]
    fresh = ShapesConceptDataset(num_samples=300, seed=0, transform=lambda im: np.asarray(im).sum())
    assert fresh[5][0] == np.asarray(img).sum()
    with pytest.raises(IndexError):
        shapes64[300]


def test_small_image_size():
    ds = ShapesConceptDataset(num_samples=20, image_size=32, seed=0)
    s = ds.sample(0)
    assert s["image"].shape == (32, 32, 3) and s["masks"].shape[1:] == (32, 32)
    assert ds.presence_matrix().shape == (20, 18)


def test_generation_speed():
    ds = ShapesConceptDataset(num_samples=2000, image_size=64, seed=11)
    start = time.perf_counter()
    ds.materialize()
    elapsed = time.perf_counter() - start
    print(f"generated {2000 / elapsed:.0f} images/s (64x64)")
    assert elapsed < 10


def test_workers_see_identical_data():
    ds = ShapesConceptDataset(num_samples=16, image_size=32, seed=5, transform=lambda im: torch.from_numpy(
        np.asarray(im).copy()))
    serial = torch.stack([ds[i][0] for i in range(16)])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    parallel = torch.cat([x for x, _ in loader])
    assert torch.equal(serial, parallel)


def test_concept_datamodule():
    dm = ConceptDataModule(num_train=64, num_val=32, num_test=16, image_size=32, batch_size=16)
    assert dm.num_classes == 6 and dm.class_names == list(SHAPES) and dm.in_channels == 3
    assert dm.image_size == 32 and len(dm.concept_names) == len(dm.concept_categories) == 18
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,) and y.dtype == torch.int64
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert len(dm.val_dataloader().dataset) == 32 and len(dm.test_dataloader().dataset) == 16
    train = {dm.probe_dataset("train").image(i).tobytes() for i in range(64)}
    val = {dm.probe_dataset("val").image(i).tobytes() for i in range(32)}
    assert not train & val
    probe = dm.probe_set("val")
    assert isinstance(probe, ProbeSet) and "shapes" in probe.name and "val" in probe.name
    assert not probe.grayscale and len(probe) == 32
    assert isinstance(probe.dataset, ShapesConceptDataset)  # masks and presence reachable for scoring
    assert isinstance(probe.raw(0), Image.Image)
    assert probe.network_dataset()[0][0].shape == (3, 32, 32)


def test_concept_datamodule_trains_with_lightning(tmp_path):
    import lightning as L

    seen = {"train": [], "val": []}

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 6))

        def training_step(self, batch, _):
            x, y = batch
            seen["train"].append((tuple(x.shape), y.dtype, self.trainer.datamodule is dm))
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            seen["val"].append((tuple(x.shape), y.dtype, self.trainer.datamodule is dm))
            self.log("val/loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ConceptDataModule(num_train=32, num_val=16, num_test=16, image_size=16, batch_size=8, augment=True)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), datamodule=dm)
    batch = ((8, 3, 16, 16), torch.int64, True)
    assert seen == {"train": [batch, batch], "val": [batch, batch]}
    assert trainer.state.finished and torch.isfinite(trainer.callback_metrics["val/loss"])


def test_datamodule_argument_errors():
    with pytest.raises(ValueError, match="data.init_args.batch_size"):
        ConceptDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        CIFAR10DataModule("x", val_fraction=1.5)
    with pytest.raises(ValueError, match="val_fraction"):
        FashionMNISTDataModule("x", val_fraction=0.0)
    with pytest.raises(ValueError, match="split"):
        ConceptDataModule(num_train=8, num_val=8, num_test=8, image_size=16).probe_dataset("holdout")
    with pytest.raises(RuntimeError, match="setup"):
        ConceptDataModule(num_train=8, num_val=8, num_test=8, image_size=16).train_dataloader()


def test_held_out_split_deterministic_and_disjoint():
    tr, va = held_out_split(100, 0.1, seed=0)
    assert (tr, va) == held_out_split(100, 0.1, seed=0)
    assert held_out_split(100, 0.1, seed=1)[1] != va
    assert len(va) == 10 and sorted(tr + va) == list(range(100))
    with pytest.raises(ValueError, match="val_fraction"):
        held_out_split(3, 0.01, seed=0)


# ---------------------------------------------------------------------------------------------- CIFAR
def _cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for b in range(1, 6):
        _dump(root / f"data_batch_{b}", {"data": _cifar_images(4, b), "labels": [(b + k) % 10 for k in range(4)]})
    _dump(root / "test_batch", {"data": _cifar_images(6, 0), "labels": list(range(6))})
    _dump(root / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                  "horse", "ship", "truck"]})
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _dump(root / "train", {"data": _cifar_images(20, 1), "fine_labels": [k * 5 for k in range(20)],
                           "coarse_labels": [k % 20 for k in range(20)]})
    _dump(root / "test", {"data": _cifar_images(5, 2), "fine_labels": [99, 0, 1, 2, 3],
                          "coarse_labels": [0] * 5})
    _dump(root / "meta", {"fine_label_names": CIFAR100_CLASSES, "coarse_label_names": [str(i) for i in range(20)]})
    return tmp_path


def test_cifar10_datamodule(cifar10_dir):
    dm = CIFAR10DataModule(str(cifar10_dir), download=False, batch_size=4, num_workers=0, val_fraction=0.2)
    assert dm.num_classes == 10 and dm.class_names[0] == "airplane" and dm.in_channels == 3 and dm.image_size == 32
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.dataset("train")) == 16 and len(dm.dataset("val")) == 4 and len(dm.dataset("test")) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, yt = next(iter(dm.test_dataloader()))
    assert yt.tolist() == [0, 1, 2, 3]

    # val gets the eval transform only; train is augmented
    raw_val, val = dm.probe_dataset("val"), dm.dataset("val")
    for i in range(len(val)):
        image, label = raw_val[i]
        assert torch.equal(val[i][0], dm.eval_transform(image)) and val[i][1] == label
        assert torch.equal(val[i][0], val[i][0])
    train = dm.dataset("train")
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(10))

    probe = dm.probe_set("val")
    assert probe.name == "cifar10-val" and len(probe) == 4 and not probe.grayscale
    img = probe.raw(0)
    assert isinstance(img, Image.Image) and img.size == (32, 32)
    assert probe.network_dataset()[0][0].shape == (3, 32, 32)

    # the raw test images are the pickled pixels, untouched
    data = _cifar_images(6, 0).reshape(6, 3, 32, 32).transpose(0, 2, 3, 1)
    assert np.array_equal(np.asarray(dm.probe_dataset("test")[2][0]), data[2])


def test_cifar100_datamodule(cifar100_dir):
    dm = CIFAR100DataModule(str(cifar100_dir), download=False, batch_size=5, num_workers=0, val_fraction=0.25)
    assert dm.num_classes == 100 == len(set(dm.class_names))
    assert dm.class_names == sorted(dm.class_names)  # CIFAR-100 fine labels are alphabetical
    dm.setup()
    assert len(dm.dataset("train")) == 15 and len(dm.dataset("val")) == 5
    assert [dm.probe_dataset("test")[i][1] for i in range(5)] == [99, 0, 1, 2, 3]
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (5, 3, 32, 32)
    assert dm.probe_set("test").name == "cifar100-test"


@pytest.mark.parametrize("download", [True, False])
def test_cifar_missing_gives_one_clear_error(tmp_path, monkeypatch, download):
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", _no_network)
    for cls, folder in ((CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")):
        dm = cls(str(tmp_path / "nowhere"), download=download, num_workers=0)
        with pytest.raises(FileNotFoundError) as err:
            dm.prepare_data()
        msg = str(err.value)
        assert folder in msg and "data.init_args.data_dir" in msg
        if download:
            assert "download failed" in msg and "network disabled" in msg
        with pytest.raises(FileNotFoundError, match=folder):
            dm.setup()


def test_cifar_ignores_md5_but_needs_every_file(cifar10_dir):
    os.remove(cifar10_dir / "cifar-10-batches-py" / "data_batch_3")
    dm = CIFAR10DataModule(str(cifar10_dir), download=False, num_workers=0)
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        dm.setup()


# -------------------------------------------------------------------------------------- Fashion-MNIST
def _write_idx(path, array, gz):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def _write_fashion(folder, gz, n_train=20, n_test=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        ("train", "images"): rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        ("train", "labels"): (np.arange(n_train) % 10).astype(np.uint8),
        ("test", "images"): rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        ("test", "labels"): (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for key, name in FASHION_MNIST_FILES.items():
        _write_idx(folder / (name + (".gz" if gz else "")), arrays[key], gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", a, gz)
    b = read_idx(str(tmp_path / "a"))
    assert b.dtype == np.uint8 and np.array_equal(a, b)


def test_read_idx_rejects_non_idx_and_truncated(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(str(tmp_path / "junk"))
    a = np.zeros((3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t", a, gz=False)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "t"))


@pytest.mark.parametrize("layout,gz", [("flat", True), ("torchvision", False), ("torchvision", True)])
def test_fashion_mnist_layouts(tmp_path, layout, gz):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = _write_fashion(folder, gz)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=4, num_workers=0, val_fraction=0.25)
    assert dm.in_channels == 1 and dm.image_size == 28 and dm.num_classes == 10
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[-1] == "Ankle boot"
    dm.prepare_data()
    dm.setup()
    assert len(dm.dataset("train")) == 15 and len(dm.dataset("val")) == 5 and len(dm.dataset("test")) == 8
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and y.dtype == torch.int64
    image, label = dm.probe_dataset("test")[1]
    assert isinstance(image, Image.Image) and image.mode == "L"
    assert np.array_equal(np.asarray(image), arrays["test", "images"][1]) and label == arrays["test", "labels"][1]
    val_raw, val = dm.probe_dataset("val"), dm.dataset("val")
    assert torch.equal(val[0][0], dm.eval_transform(val_raw[0][0]))
    probe = dm.probe_set("val")
    assert probe.grayscale and probe.name == "fashion_mnist-val"
    assert probe.raw(0).mode == "RGB" and probe.network_dataset()[0][0].shape == (1, 28, 28)


@pytest.mark.parametrize("download", [True, False])
def test_fashion_mnist_missing_gives_one_clear_error(tmp_path, monkeypatch, download):
    import torchvision.datasets.mnist

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", _no_network)
    dm = FashionMNISTDataModule(str(tmp_path / "empty"), download=download, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    for name in FASHION_MNIST_FILES.values():
        assert name in msg
    assert "FashionMNIST/raw" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "data.init_args.data_dir" in msg
    with pytest.raises(FileNotFoundError, match="apt-get"):
        dm.setup()


@pytest.mark.skipif(find_fashion_mnist_files(DEBIAN_DIR) is None,
                    reason="apt-get install dataset-fashion-mnist to run")
def test_fashion_mnist_debian_files():
    dm = FashionMNISTDataModule(num_workers=0, batch_size=256)
    dm.setup()
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 60000
    assert len(dm.dataset("val")) == 6000 and len(dm.dataset("test")) == 10000
    labels = dm.probe_dataset("test").labels  # the raw test split itself, no subset
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (256, 1, 28, 28)
    assert abs(x.mean().item()) < 0.3  # normalised with the dataset's own statistics


def test_datamodules_share_base():
    assert all(issubclass(c, VisionDataModule) for c in (ConceptDataModule, CIFAR10DataModule,
                                                          CIFAR100DataModule, FashionMNISTDataModule))


@pytest.mark.slow
def test_small_cnn_learns_shapes():
    """A small CNN beats chance (1/6) by a wide margin in under a CPU minute at 32x32."""
    torch.manual_seed(0)
    dm = ConceptDataModule(num_train=4000, num_val=500, num_test=100, image_size=32, batch_size=64)
    dm.setup()

    def block(i, o):
        return torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU(),
                                   torch.nn.MaxPool2d(2))

    net = torch.nn.Sequential(block(3, 32), block(32, 64), block(64, 128), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(128, 6))
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    for _ in range(4):
        net.train()
        for x, y in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        correct = sum((net(x).argmax(1) == y).sum().item() for x, y in dm.val_dataloader())
    print(f"shapes val accuracy after 4 epochs: {correct / 500:.3f}")
    assert correct / 500 > 0.5
