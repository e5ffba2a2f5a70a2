"""litdata shards: the ImageFolder converter (function and CLI) and StreamingImageDataModule, on a tiny folder."""
import hashlib
import io
import json
import multiprocessing
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny_imagefolder import NAMES, WNIDS, folder_items, make_image_folder

from lwta_vision.cli import cli_main
from lwta_vision.data import StreamingImageDataModule, VisionDataModule
from lwta_vision.data.shards import CLASSES_FILE, convert_image_folder
from lwta_vision.data.shards import main as shards_main

litdata = pytest.importorskip("litdata")
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _litdata_scratch_in_tmp(tmp_path_factory):
    # litdata's optimizer scratch folders default to /tmp/chunks and /tmp/data
    scratch = tmp_path_factory.mktemp("litdata")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(scratch / "chunks"))
        mp.setenv("DATA_OPTIMIZER_DATA_CACHE_FOLDER", str(scratch / "data"))
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """``(image folder, shard folder)``: 3 classes, 12 train and 6 val images, ~4 images per shard file."""
    src = make_image_folder(tmp_path_factory.mktemp("folder"))
    dst = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        # fork: workers need not re-import torch (litdata's default "spawn" is covered by the CLI test)
        convert_image_folder(str(src), str(dst), split, num_workers=2, chunk_bytes="20KB", start_method="fork")
    return src, dst


def _digest(data) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def _folder_digests(split_dir) -> Counter:
    return Counter((_digest(data), label) for data, label in folder_items(split_dir))


def test_converter_writes_every_image_once_with_its_label(shards):
    src, dst = shards
    for split, n in (("train", 12), ("val", 6)):
        out = dst / split
        assert (out / "index.json").is_file() and len(list(out.glob("chunk-*.bin"))) >= 2
        meta = json.loads((out / CLASSES_FILE).read_text())
        assert meta["classes"] == list(WNIDS) and meta["class_names"] == list(NAMES)
        assert meta["num_images"] == n and meta["split"] == split
        stream = litdata.StreamingDataset(str(out))
        items = [stream[i] for i in range(len(stream))]
        assert len(items) == n
        # the stored bytes are the files themselves (JPEG stays JPEG), paired with the folder's label
        assert Counter((_digest(it["image"]), it["label"]) for it in items) == _folder_digests(src / split)
    assert not [p for p in dst.iterdir() if p.name.startswith(".")]  # no partial folder left behind


def test_converter_restores_the_multiprocessing_start_method(tmp_path):
    """litdata.optimize forces a process-wide start method; later DataLoaders must not inherit it."""
    before = multiprocessing.get_start_method(allow_none=True)
    src = make_image_folder(tmp_path / "src", per_split=(("val", 1),))
    try:
        multiprocessing.set_start_method(None, force=True)  # unset, as in a fresh process
        convert_image_folder(str(src), str(tmp_path / "dst"), "val", num_workers=1, start_method="fork")
        assert multiprocessing.get_start_method(allow_none=True) is None
    finally:
        multiprocessing.set_start_method(before, force=True)


def test_converter_refuses_to_overwrite_and_checks_classes_across_splits(tmp_path, shards):
    src = make_image_folder(tmp_path / "src", per_split=(("train", 1), ("val", 1)))
    dst = tmp_path / "dst"
    convert_image_folder(str(src), str(dst), "val", num_workers=1, start_method="fork")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_image_folder(str(src), str(dst), "val", num_workers=1, start_method="fork")
    first = (dst / "val" / "index.json").read_text()
    convert_image_folder(str(src), str(dst), "val", num_workers=1, overwrite=True, start_method="fork")
    assert (dst / "val" / "index.json").is_file() and json.loads(first)["chunks"]
    (dst / "train").mkdir()
    (dst / "train" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not litdata shards"):
        convert_image_folder(str(src), str(dst), "train", num_workers=1, overwrite=True, start_method="fork")
    assert (dst / "train" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="is a URL"):
        convert_image_folder(str(src), "s3://bucket/shards", "val")
    (src / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        convert_image_folder(str(src), str(tmp_path / "dst3"), "empty")
    # a train split whose classes differ from those of the val shards already in dst
    shutil.rmtree(dst / "train")
    (src / "train" / WNIDS[0]).rename(src / "train" / "n99999999")
    with pytest.raises(ValueError, match="same class folders"):
        convert_image_folder(str(src), str(dst), "train", num_workers=1, start_method="fork")


def test_converter_cli(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", per_split=(("val", 2),))
    # litdata's default start method ("spawn"): the item function is importable in fresh worker processes
    shards_main(["--src", str(src), "--dst", str(tmp_path / "out"), "--splits", "val", "--num_workers", "1",
                 "--chunk_bytes", "20000"])
    assert "val: 6 images" in capsys.readouterr().out
    assert len(litdata.StreamingDataset(str(tmp_path / "out" / "val"))) == 6
    for args, expected in (
        (["--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "o")], "source folder"),
        (["--src", str(src), "--dst", str(tmp_path / "o"), "--splits", "train"], "train"),
        (["--src", str(src), "--dst", str(tmp_path / "out"), "--splits", "val"], "--overwrite"),
    ):
        with pytest.raises(SystemExit) as exc:
            shards_main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "o").exists()


def test_streaming_datamodule(shards):
    src, dst = shards
    dm = StreamingImageDataModule(str(dst), image_size=32, batch_size=5, num_workers=0)
    assert isinstance(dm, VisionDataModule)
    assert dm.class_names == list(NAMES) and dm.num_classes == 3 and dm.in_channels == 3 and dm.image_size == 32
    dm.setup()
    train = dm.train_dataloader()
    assert isinstance(train, litdata.StreamingDataLoader) and len(train) == 3
    batches = list(train)
    assert [x.shape for x, _ in batches] == [(5, 3, 32, 32), (5, 3, 32, 32), (2, 3, 32, 32)]
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)
    labels = torch.cat([y for _, y in batches]).tolist()
    assert Counter(labels) == Counter(label for _, label in folder_items(src / "train"))
    assert labels != sorted(labels)  # shuffled
    again = torch.cat([y for _, y in dm.train_dataloader()]).tolist()
    assert Counter(again) == Counter(labels)
    # evaluation: stored order, Resize + CenterCrop + normalise of the decoded file
    val_x, val_y = (torch.cat(t) for t in zip(*dm.val_dataloader()))
    raw = dm.probe_dataset("val")
    assert len(raw) == 6 and val_y.tolist() == [raw[i][1] for i in range(6)]
    for i in range(6):
        assert torch.equal(val_x[i], dm.eval_transform(raw[i][0]))
    # the raw items are the files' decoded images with the files' labels
    decoded = Counter((Image.open(io.BytesIO(data)).convert("RGB").tobytes(), label)
                      for data, label in folder_items(src / "val"))
    assert Counter((raw[i][0].tobytes(), raw[i][1]) for i in range(6)) == decoded
    assert len(dm.dataset("test")) == 6 and dm.dataset("val")[0][0].shape == (3, 32, 32)
    probe = dm.probe_set("val")
    assert probe.name == "shards-val" and len(probe) == 6
    assert isinstance(probe.raw(0), Image.Image) and probe.raw(0).size == (48, 40)
    assert probe.network_dataset()[0][0].shape == (3, 32, 32)


def test_ranks_read_disjoint_shares(shards, monkeypatch):
    """Under DDP train gives every rank the same number of images, none twice (litdata reads the rank from
    torch.distributed, or WORLD_SIZE/GLOBAL_RANK as here); val gives each rank a contiguous slice, every image
    exactly once, even when the split is smaller than one batch per rank."""
    _, dst = shards
    train, val = [], []
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        # augment=False: train images are deterministic too, so each image is identified by its tensor
        dm = StreamingImageDataModule(str(dst), image_size=16, batch_size=2, num_workers=0, augment=False)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what the Trainer sets under DDP
        dm.setup()
        train.append([_digest(x.numpy().tobytes()) for xb, _ in dm.train_dataloader() for x in xb])
        dm.batch_size = 4  # 6 val images < 2 ranks x 4: every rank still gets a batch
        loader = dm.val_dataloader()
        assert len(loader) == 1 and isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        val.append([_digest(x.numpy().tobytes()) for xb, _ in loader for x in xb])
    assert len(train[0]) == len(train[1]) == 6 and len(set(train[0] + train[1])) == 12
    assert len(val[0]) == len(val[1]) == 3 and len(set(val[0] + val[1])) == 6
    dm.trainer = None
    assert val[0] + val[1] == [_digest(x.numpy().tobytes()) for xb, _ in dm.val_dataloader() for x in xb]


def test_missing_shards_and_missing_litdata(tmp_path, monkeypatch):
    dm = StreamingImageDataModule(str(tmp_path / "nowhere"), num_workers=0)
    assert dm.num_classes == 1000 and dm.class_names[0] == "tench"  # builds before the data exists
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    assert "python -m lwta_vision.data.shards" in str(err.value) and "data.init_args.data_dir" in str(err.value)
    monkeypatch.setitem(sys.modules, "litdata", None)  # import litdata -> ImportError
    for make in (lambda: StreamingImageDataModule(str(tmp_path)),
                 lambda: convert_image_folder(str(tmp_path), str(tmp_path / "o"), "train")):
        with pytest.raises(ImportError) as err:
            make()
        assert "pip install 'lwta_vision[stream]'" in str(err.value)
        assert isinstance(err.value, ValueError)  # train.py shows it as one error: line

# an ImageNet recipe with LWTA, reading shards (README: "ImageNet and streaming shards")
STREAMING_CONFIG = [f"--config={ROOT / 'configs' / name}"
                    for name in ("imagenet_resnet50.yaml", "act/lwta_u2.yaml", "data/imagenet_streaming.yaml")]


def test_train_py_fast_dev_run_streaming(shards, tmp_path):
    _, dst = shards
    runs = str(tmp_path / "runs")
    cli = cli_main([
        "fit", *STREAMING_CONFIG,
        "--model.init_args.model", "convnet_small",
        "--model.init_args.model_kwargs", '{"widths": [8, 16]}',
        "--data.init_args.data_dir", str(dst), "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0", "--data.init_args.pin_memory", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", runs,
        "--trainer.logger.init_args.save_dir", runs])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert cli.model.class_names == list(NAMES) and cli.model.hparams.num_classes == 3


@pytest.mark.slow
def test_ddp_two_processes_through_train_py(shards, tmp_path):
    """Real DDP (2 CPU processes) on the streaming config: litdata shards train per rank, val is sliced."""
    import csv
    import os
    import subprocess

    _, dst = shards
    runs = str(tmp_path / "runs")
    cmd = [sys.executable, str(ROOT / "train.py"), "fit",
           *STREAMING_CONFIG,
           "--model.init_args.model", "convnet_small",
           "--model.init_args.model_kwargs", '{"widths": [8, 16]}',
           "--data.init_args.data_dir", str(dst), "--data.init_args.image_size", "32",
           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "1",
           "--data.init_args.pin_memory", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.precision", "32-true", "--trainer.max_epochs", "2",
           "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", runs,
           "--trainer.logger.init_args.save_dir", runs, "--trainer.logger.init_args.name", "ddp"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(next(tmp_path.glob("runs/ddp/version_*/metrics.csv")))))
    assert len([r for r in rows if r.get("val/acc")]) == 2
