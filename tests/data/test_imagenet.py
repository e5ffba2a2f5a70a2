"""ImageNetDataModule on a tiny generated ImageFolder (real wnid folder names), its errors, and the ImageNet configs."""
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_imagefolder import NAMES, WNIDS, make_image_folder
from torchvision import datasets

from lwta_vision.cli import cli_main
from lwta_vision.cli import main as train_main
from lwta_vision.data import ImageNetDataModule, VisionDataModule
from lwta_vision.data.imagenet import imagenet_class_names, imagenet_wnids, readable_class_names

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# a tiny LWTA CNN on 32x32 crops instead of the config's ResNet-50 on 224x224, on the CPU in fp32
TINY_RUN = ["--model.init_args.model", "convnet_small",
            "--model.init_args.model_kwargs", '{"widths": [8, 16]}',
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4", "--data.init_args.num_workers",
            "0", "--data.init_args.pin_memory", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def _out(tmp_path):
    runs = str(tmp_path / "runs")
    return ["--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
            "--trainer.logger.init_args.name", "t"]


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"))


def test_wnid_list_is_the_sorted_1000_and_matches_the_names():
    wnids, names = imagenet_wnids(), imagenet_class_names()
    assert len(wnids) == len(set(wnids)) == 1000 == len(names) == len(set(names))
    assert list(wnids) == sorted(wnids) and all(w.startswith("n") and len(w) == 9 for w in wnids)
    named = dict(zip(wnids, names))
    # spot checks across the list (label index in the standard ordering)
    assert (wnids.index("n01440764"), named["n01440764"]) == (0, "tench")
    assert (wnids.index("n02123045"), named["n02123045"]) == (281, "tabby cat")
    assert (wnids.index("n02690373"), named["n02690373"]) == (404, "airliner")
    assert (wnids.index("n04285008"), named["n04285008"]) == (817, "sports car")
    assert (wnids.index("n15075141"), named["n15075141"]) == (999, "toilet paper")
    assert readable_class_names(["n01443537", "my_class"]) == ["goldfish", "my_class"]


def test_imagenet_datamodule_on_an_image_folder(tiny_imagenet):
    dm = ImageNetDataModule(str(tiny_imagenet), image_size=32, batch_size=4, num_workers=0)
    assert isinstance(dm, VisionDataModule)
    assert dm.num_classes == 3 and dm.class_names == list(NAMES) and dm.folder_names == list(WNIDS)
    assert dm.in_channels == 3 and dm.image_size == 32 and dm.resize == 37  # round(32 / 0.875)
    dm.prepare_data()
    dm.setup()
    assert len(dm.dataset("train")) == 12 and len(dm.dataset("val")) == 6 and len(dm.dataset("test")) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 32, 32) and yv.tolist() == [0, 0, 1, 1]  # val is not shuffled
    # val/test: Resize + CenterCrop + normalise, deterministic; train: random crops
    raw, val = dm.probe_dataset("val"), dm.dataset("val")
    for i in range(len(val)):
        assert torch.equal(val[i][0], dm.eval_transform(raw[i][0])) and val[i][1] == raw[i][1]
    train = dm.dataset("train")
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(10))
    # probe set: raw PIL images at their file size, the network's eval transform
    probe = dm.probe_set("val")
    assert probe.name == "imagenet-val" and len(probe) == 6 and not probe.grayscale
    assert isinstance(probe.raw(0), Image.Image) and probe.raw(0).size == (48, 40) and probe.label(5) == 2
    assert probe.network_dataset()[0][0].shape == (3, 32, 32)


def test_standard_sizes_and_custom_resize(tiny_imagenet):
    dm = ImageNetDataModule(str(tiny_imagenet), num_workers=0)
    assert dm.image_size == 224 and dm.resize == 256
    assert dm.eval_transform(Image.new("RGB", (300, 500))).shape == (3, 224, 224)
    dm = ImageNetDataModule(str(tiny_imagenet), image_size=64, resize=80, num_workers=0, augment=False)
    assert dm.resize == 80 and dm.train_transform is not None
    image = Image.new("RGB", (100, 160))
    assert torch.equal(dm.train_transform(image), dm.eval_transform(image))  # augment=False: eval transform
    with pytest.raises(ValueError, match="data.init_args.resize"):
        ImageNetDataModule(str(tiny_imagenet), image_size=64, resize=32)
    with pytest.raises(ValueError, match="data.init_args.image_size"):
        ImageNetDataModule(str(tiny_imagenet), image_size=0)


def test_folder_names_that_are_not_wnids(tmp_path):
    make_image_folder(tmp_path, classes=("dog", "n01443537", "zebra_crossing"), per_split=(("train", 1), ("val", 1)))
    dm = ImageNetDataModule(str(tmp_path), image_size=16, num_workers=0)
    assert dm.class_names == ["dog", "goldfish", "zebra_crossing"] and dm.num_classes == 3
    dm.setup()
    assert [dm.probe_dataset("train")[i][1] for i in range(3)] == [0, 1, 2]


def test_missing_root_defaults_to_1000_classes_and_fails_clearly_at_setup(tmp_path):
    dm = ImageNetDataModule(str(tmp_path / "nowhere"), num_workers=0)
    assert dm.num_classes == 1000 and dm.class_names[:2] == ["tench", "goldfish"]
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as err:
            step()
        msg = str(err.value)
        assert "nowhere" in msg and "does not exist" in msg
        assert "image-net.org" in msg and "data.init_args.data_dir" in msg and "train/<class>" in msg


def _break(root: Path, case: str) -> None:
    if case == "no train":
        (root / "train").rename(root / "training")
    elif case == "no val":
        (root / "val").rename(root / "validation")
    elif case == "empty val":
        for folder in (root / "val").iterdir():
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
    elif case == "class without images":
        for f in (root / "val" / WNIDS[1]).iterdir():
            f.unlink()
    elif case == "class mismatch":
        (root / "val" / WNIDS[2]).rename(root / "val" / "n99999999")


@pytest.mark.parametrize("case,error,expected", [
    ("no train", FileNotFoundError, ["has no train/ folder", "data.init_args.data_dir"]),
    ("no val", FileNotFoundError, ["has no val/ folder", "valprep.sh", "torchvision.datasets.ImageNet"]),
    ("empty val", FileNotFoundError, ["val split", "is empty", "no class folders"]),
    ("class without images", FileNotFoundError, ["class folders without images", WNIDS[1], ".jpeg"]),
    ("class mismatch", ValueError, ["different class folders", f"only in train/: {WNIDS[2]}",
                                    "only in val/: n99999999"]),
])
def test_layout_errors_name_the_fix(tmp_path, case, error, expected):
    root = make_image_folder(tmp_path, per_split=(("train", 1), ("val", 2)))
    dm = ImageNetDataModule(str(root), image_size=16, num_workers=0)
    _break(root, case)
    with pytest.raises(error) as err:
        dm.setup()
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_torchvision_layout_with_meta_bin(tmp_path):
    root = make_image_folder(tmp_path, per_split=(("train", 2), ("val", 1)))
    wnid_to_classes = {w: (n, f"{n} (torchvision)") for w, n in zip(WNIDS, NAMES)}
    torch.save((wnid_to_classes, list(WNIDS)), root / "meta.bin")
    dm = ImageNetDataModule(str(root), image_size=16, num_workers=0)
    dm.prepare_data()
    dm.setup()
    train = dm.probe_dataset("train")
    assert isinstance(train, datasets.ImageNet) and train.wnids == list(WNIDS)
    assert dm.class_names == list(NAMES)  # our readable names, not torchvision's tuples
    assert [train[i][1] for i in range(len(train))] == [0, 0, 1, 1, 2, 2]
    # a meta.bin without the split folders or their archives is the same clear error
    (root / "val").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="has no val/ folder"):
        ImageNetDataModule(str(root), image_size=16, num_workers=0).setup()


def test_torchvision_layout_with_a_corrupt_devkit(tmp_path):
    """Only the devkit (torchvision makes meta.bin from it): a truncated download is one clear error."""
    root = make_image_folder(tmp_path, per_split=(("train", 1), ("val", 1)))
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"not the devkit")
    dm = ImageNetDataModule(str(root), image_size=16, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "torchvision could not read ImageNet" in msg and "ILSVRC2012_devkit_t12.tar.gz" in msg
    assert "Download the file again" in msg


def test_train_py_fast_dev_run_on_the_imagenet_config(tiny_imagenet, tmp_path):
    cli = cli_main(["fit", "--config", str(CONFIGS / "imagenet_resnet50.yaml"),
                    "--config", str(CONFIGS / "act" / "lwta_u2.yaml"), *TINY_RUN, *_out(tmp_path),
                    "--data.init_args.data_dir", str(tiny_imagenet), "--trainer.fast_dev_run", "2"])
    assert cli.trainer.state.finished and cli.trainer.global_step == 2
    assert cli.model.hparams.num_classes == 3 and cli.model.class_names == list(NAMES)  # linked from the data
    assert cli.model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_train_py_missing_imagenet_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["fit", "--config", str(CONFIGS / "imagenet_resnet50.yaml"), *TINY_RUN, *_out(tmp_path),
                    "--data.init_args.data_dir", str(tmp_path / "no_imagenet"), "--trainer.fast_dev_run", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "no_imagenet" in lines[0] and "does not exist" in lines[0] and "image-net.org" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_vit_configs_follow_the_deit_schedule():
    cli = cli_main(["--config", str(CONFIGS / "imagenet_vit_small.yaml"),
                    "--config", str(CONFIGS / "act" / "lwta_u24.yaml"), "--trainer.logger", "false",
                    "--data.init_args.data_dir", "nowhere"], run=False)
    assert cli.model.hparams.label_smoothing == 0.1 and cli.datamodule.num_classes == 1000
    config = cli.model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.05
    lrs = []
    for _ in range(cli.trainer.max_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert len(lrs) == 300
    assert lrs[0] == pytest.approx(1e-6) and lrs[4] == pytest.approx(5e-4)  # 5 warmup epochs
    assert max(lrs) == pytest.approx(5e-4) and lrs[-1] == pytest.approx(1e-5, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then cosine decay, never up again
