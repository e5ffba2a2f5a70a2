"""Bad-input sweep: every wrong input to train.py, dissect.py or a config gives ONE clear error that names
the fix, no traceback, exit code 2, and no partial output (README "Troubleshooting" lists the same cases).

train.py cases call ``lwta_vision.cli.main`` (what train.py runs) in-process; one case runs the real
script as a subprocess. dissect.py cases call ``lwta_vision.dissect_cli.main``.
"""
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lwta_vision.cli import cli_main
from lwta_vision.cli import main as train_main
from lwta_vision.dissect_cli import main as dissect_main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
TRAINER = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.num_sanity_val_steps", "0"]
FAST = ["--data.init_args.num_train", "64", "--data.init_args.num_val", "32", "--data.init_args.num_test", "32",
        "--data.init_args.batch_size", "32", *TRAINER]


def _out(tmp_path):
    """Every train.py output under tmp_path/runs (which must not exist after a failure)."""
    runs = str(tmp_path / "runs")
    return ["--trainer.default_root_dir", runs, "--trainer.logger.init_args.save_dir", runs,
            "--trainer.logger.init_args.name", "t"]


def _quick(tmp_path, *extra):
    return ["fit", "--config", QUICK, *FAST, *_out(tmp_path), "--trainer.callbacks", "[]", *extra]


def _one_error(main, args, capsys) -> str:
    """Run a CLI main expecting exit code 2 and exactly one ``error:`` line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    return err


def _train_error(args, capsys) -> str:
    return _one_error(train_main, args, capsys)


def _dissect_error(args, capsys) -> str:
    return _one_error(dissect_main, args, capsys)


def _png(path, mode="RGB", size=(20, 24), seed=0):
    rng = np.random.default_rng(seed)
    chans = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], chans), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if chans == 1 else arr, mode).save(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny quickstart run: its last.ckpt (config.yaml beside checkpoints/ gives the datamodule)."""
    tmp = tmp_path_factory.mktemp("run")
    cli_main(["fit", "--config", QUICK, *FAST, "--trainer.callbacks", "[]", "--trainer.logger.init_args.save_dir",
              str(tmp), "--trainer.default_root_dir", str(tmp)])
    return next(tmp.glob("**/checkpoints/last.ckpt"))


@pytest.fixture(scope="module")
def labels(run, tmp_path_factory):
    """Labels written by ``describe`` for ``explain``."""
    out = tmp_path_factory.mktemp("labels") / "d"
    dissect_main(["describe", "--checkpoint", str(run), "--layers", "[layer3, fc]", "--max_images", "32",
                  "--output_dir", str(out), "--device", "cpu", "--html", "false"])
    return out


@pytest.fixture(scope="module")
def clip_args(tmp_path_factory):
    """dissect.py flags for a tiny random-weight CLIP from a local file (works offline)."""
    import open_clip
    from tiny_clip import register_tiny_clip

    tmp = tmp_path_factory.mktemp("clip")
    name = register_tiny_clip()
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), tmp / "tiny.pt")
    (tmp / "concepts.txt").write_text("red\nblue\ncircle\nsquare\n")
    return ["--scorer", "clip", "--clip_model", name, "--clip_pretrained", "null", "--clip_checkpoint",
            str(tmp / "tiny.pt"), "--concepts", str(tmp / "concepts.txt"), "--cache_dir", str(tmp / "cache"),
            "--html", "false", "--device", "cpu"]


@pytest.fixture
def folder(tmp_path):
    """A probe folder with RGB, RGBA and grayscale images and a non-image file."""
    d = tmp_path / "probe"
    (d / "sub").mkdir(parents=True)
    for i in range(4):
        _png(d / f"rgb{i}.png", "RGB", seed=i)
    _png(d / "alpha.png", "RGBA", seed=5)
    _png(d / "sub" / "gray.jpg", "L", seed=6)
    (d / "notes.txt").write_text("not an image")
    (d / "._rgb0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: hidden, skipped
    return d


# ------------------------------------------------------------------------------------------------ train.py
@pytest.mark.parametrize("case,args,expect", [
    ("unknown model", ["--model.init_args.model", "resnet-18"], "unknown model 'resnet-18' (did you mean resnet18"),
    ("competitors not dividing the width",
     ["--model.init_args.act_kwargs", '{"competitors": 24}'],
     "LWTA: layer width 32 is not divisible by competitors=24; choose competitors dividing 32"),
    ("misspelled model_kwargs key", ["--model.init_args.model_kwargs", '{"widht": [8, 16, 32]}'],
     "model 'convnet_small': ConvNet.__init__() got an unexpected keyword argument 'widht' (check model_kwargs"),
    ("batch size zero", ["--data.init_args.batch_size", "0"], "batch_size must be positive, got 0"),
    ("negative batch size", ["--data.init_args.batch_size", "-4"], "batch_size must be positive, got -4"),
    ("compile options without compile", ["--model.init_args.compile_kwargs", '{"mode": "max-autotune"}'],
     "compile_kwargs are set but compile is false; set model.init_args.compile: true"),
    ("unknown LWTA implementation",
     ["--model.init_args.act_kwargs", '{"competitors": 4, "impl": "cuda"}'],
     "LWTA impl must be one of ('auto', 'fused', 'reference'), got 'cuda'"),
    ("activation set twice", ["--model.init_args.model_kwargs", '{"widths": [8, 16], "act": "relu"}'],
     "act is set twice, as model.init_args.act='lwta' and in model_kwargs ('relu'); set it once"),
])
def test_train_bad_model_or_data_arguments(case, args, expect, tmp_path, capsys):
    err = _train_error(_quick(tmp_path, *args), capsys)
    assert f"error: {expect}" in err
    assert "Does not validate" not in err  # jsonargparse's wrapper is peeled off: only our message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", ["--trainer.max_epoch", "--trainer.max_epocs"])
def test_train_misspelled_flag_names_the_key(flag, tmp_path, capsys):
    # argparse would take --trainer.max_epoch as an abbreviation of max_epochs: abbreviations are off
    err = _train_error(_quick(tmp_path, flag, "2"), capsys)
    assert f"unrecognized arguments: {flag} 2" in err


def test_train_unknown_yaml_key_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("trainer:\n  max_epocs: 3\n")
    err = _train_error(_quick(tmp_path, "--config", str(cfg)), capsys)
    assert "does not accept option 'trainer.max_epocs'" in err


def test_train_wrong_callback_layer_fails_before_any_output(tmp_path, capsys):
    args = ["fit", "--config", QUICK, *FAST, *_out(tmp_path), "--trainer.callbacks.init_args.layers", "[layer9, fc]"]
    err = _train_error(args, capsys)
    assert "error: layer 'layer9' not found in ConvNet; closest: layer3" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("download", [False, True])
def test_train_cifar_files_missing(download, tmp_path, capsys, monkeypatch):
    import lwta_vision.data.cifar as cifar

    def no_network(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(cifar.CIFAR10Files, "download", no_network)
    args = ["fit", "--config", str(ROOT / "configs" / "cifar10_resnet18.yaml"), *TRAINER, *_out(tmp_path),
            "--data.init_args.data_dir", str(tmp_path / "cifar"), "--data.init_args.download", str(download).lower(),
            "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    err = _train_error(args, capsys)
    assert f"cifar10 not found in {tmp_path / 'cifar' / 'cifar-10-batches-py'}" in err
    assert "point data.init_args.data_dir at the folder" in err
    assert ("download failed: OSError" in err) == download
    assert not (tmp_path / "runs").exists()


def _write_idx(path, arr, magic=None):
    header = magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])
    path.write_bytes(header + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes())


def test_train_fashion_mnist_corrupt_idx_file(tmp_path, capsys):
    d = tmp_path / "fmnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(d / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(d / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    _write_idx(d / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)), magic=b"PK\x03\x04")
    args = ["fit", "--config", str(ROOT / "configs" / "fashion_mnist.yaml"),
            "--config", str(ROOT / "configs" / "act" / "lwta_u4.yaml"), *_out(tmp_path),
            *TRAINER, "--data.init_args.data_dir", str(d), "--data.init_args.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    err = _train_error(args, capsys)
    assert f"error: {d / 'train-images-idx3-ubyte'} is not an idx file: its magic number is 504b0304" in err
    assert not (tmp_path / "runs").exists()  # the CSVLogger's run folder, made before setup(), is removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_gpu_accelerator_on_a_cpu_machine(tmp_path, capsys):
    err = _train_error(_quick(tmp_path, "--trainer.accelerator", "gpu", "--trainer.devices", "2",
                              "--trainer.strategy", "ddp"), capsys)
    assert "No supported gpu backend found!" in err
    assert "this machine has 0 CUDA device(s): set --trainer.accelerator cpu or auto" in err


def test_more_gpus_than_exist_is_one_line_with_the_fix():
    """Lightning's message on a GPU machine (two lines) becomes one line naming the flags."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lwta_vision.cli import error_message

    msg = error_message(MisconfigurationException("You requested gpu: [0, 1, 2, 3]\n But your machine only has: [0]"))
    assert "\n" not in msg and msg.startswith("You requested gpu: [0, 1, 2, 3] But your machine only has: [0] (")
    assert "set --trainer.accelerator cpu or auto, and --trainer.devices to at most the number available" in msg


def test_train_more_cpu_devices_than_cores(tmp_path, capsys, monkeypatch):
    import lightning.pytorch as pl

    monkeypatch.setattr(pl.Trainer, "fit", lambda *a, **k: pytest.fail("fit must not start 64 processes"))
    err = _train_error(_quick(tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "64",
                              "--trainer.strategy", "ddp"), capsys)
    assert "trainer.devices=64 with trainer.accelerator=cpu would start 64 training processes" in err
    assert "set --trainer.devices to at most" in err


def test_train_non_finite_loss_names_the_step(tmp_path, capsys):
    err = _train_error(_quick(tmp_path, "--model.init_args.optimizer.init_args.lr", "1e30"), capsys)
    assert "error: loss is nan at global step 1 (epoch 0)" in err
    assert "Lower the learning rate, enable gradient clipping" in err
    assert not (tmp_path / "runs").exists()


def test_train_output_folder_under_a_file(tmp_path, capsys):
    (tmp_path / "somefile").write_text("x")
    bad = str(tmp_path / "somefile" / "out")
    args = _quick(tmp_path, "--trainer.default_root_dir", bad)
    err = _train_error(args, capsys)
    assert f"cannot write to trainer.default_root_dir={bad!r}: {str(tmp_path / 'somefile')!r} is a file" in err


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist (pass the .ckpt written by train.py"),
    ("truncated", "is not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint)"),
    ("not a checkpoint", "is not a readable PyTorch checkpoint"),
    ("other architecture", "does not match the model being trained: 0 missing keys (e.g. []), 2 unexpected or "
                           "mis-shaped (e.g. ['model.fc.weight', 'model.fc.bias'])"),
    ("plain state dict", "is not a train.py checkpoint (it has no 'state_dict'"),
])
def test_train_bad_ckpt_path(case, expect, run, tmp_path, capsys):
    path = tmp_path / "x.ckpt"
    if case == "truncated":
        data = run.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not a checkpoint":
        path.write_text("model: resnet18\n")
    elif case == "other architecture":  # e.g. a 10-class run resumed on the 6-class data
        ckpt = torch.load(run, weights_only=False)
        ckpt["hyper_parameters"]["num_classes"] = 10
        ckpt["state_dict"]["model.fc.weight"] = torch.zeros(10, 128)
        ckpt["state_dict"]["model.fc.bias"] = torch.zeros(10)
        torch.save(ckpt, path)
    elif case == "plain state dict":
        torch.save({"fc.weight": torch.zeros(6, 128)}, path)
    err = _train_error(_quick(tmp_path, "--ckpt_path", str(path)), capsys)
    assert expect in err
    assert not (tmp_path / "runs").exists()


def test_train_py_script_prints_one_error_line(tmp_path):
    """The real entry point: one ``error:`` line, exit code 2; LWTA_DEBUG=1 shows the traceback instead."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LWTA_DEBUG", None)
    cmd = [sys.executable, str(ROOT / "train.py"), *_quick(tmp_path, "--model.init_args.model", "resnet-18")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: unknown model 'resnet-18' (did you mean resnet18, resnet50, resnet34?); available: convnet_small, "
        "resnet18, resnet34, resnet50, vit_small, vit_tiny"]
    assert not (tmp_path / "runs").exists()


def test_train_lwta_debug_reraises(tmp_path, monkeypatch):
    monkeypatch.setenv("LWTA_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown model 'resnet-18'"):
        train_main(_quick(tmp_path, "--model.init_args.model", "resnet-18"))


# ---------------------------------------------------------------------------------------------- dissect.py
def _describe(run, tmp_path, *extra):
    return ["describe", "--checkpoint", str(run), "--layers", "[layer3]", "--output_dir", str(tmp_path / "o"),
            "--device", "cpu", "--max_images", "16", *extra]


@pytest.mark.parametrize("case,extra,expect", [
    ("nested layer path", ["--layers", "[layer3.conv9]"], "layer 'layer3.conv9' not found in ConvNet; closest:"),
    ("unknown concept set", ["--concepts", "20K"], "unknown concept set '20K' (did you mean '20k'?)"),
    ("unknown similarity", ["--similarity", "soft-wpmi"], "unknown similarity 'soft-wpmi'; available: soft_wpmi"),
    ("unknown scorer", ["--scorer", "cllip"], "unknown scorer 'cllip'; choose one of auto, clip, concept_clip, ground_truth"),
    ("negative tie tolerance", ["--tie_tol", "-1"], "--tie_tol must be a finite number >= 0 (nats of soft-WPMI)"),
    ("missing concept CLIP weights", ["--scorer", "concept_clip", "--clip_checkpoint", "/nonexistent/cc.safetensors"],
     "CLIP checkpoint file not found: /nonexistent/cc.safetensors"),
    ("concepts not annotated", ["--scorer", "ground_truth", "--concepts", "cifar10"],
     "10 concepts are not annotated in the dataset: 'airplane'"),
    ("missing CIFAR data", ["--data", '{"class_path": "lwta_vision.data.CIFAR10DataModule", "init_args": '
                                      '{"data_dir": "/nonexistent/cifar", "download": false}}'],
     "cifar10 not found in /nonexistent/cifar/cifar-10-batches-py"),
])
def test_dissect_bad_names(case, extra, expect, run, tmp_path, capsys):
    err = _dissect_error(_describe(run, tmp_path, *extra), capsys)
    assert f"error: {expect}" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,expect", [
    (b"", "has no concepts (it is empty or only blank lines)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "looks binary (NUL byte at offset 8)"),
    (b"caf\xe9\nbar\n", "is not valid UTF-8 (byte 0xe9 at offset 3); re-encode it to UTF-8"),
], ids=["empty", "binary", "latin1"])
def test_dissect_bad_concept_file(content, expect, run, tmp_path, capsys):
    (tmp_path / "c.txt").write_bytes(content)
    err = _dissect_error(_describe(run, tmp_path, "--concepts", str(tmp_path / "c.txt")), capsys)
    assert expect in err
    assert not (tmp_path / "o").exists()


def test_dissect_probe_folder_without_images(run, tmp_path, capsys):
    (tmp_path / "imgs" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "imgs" / "README.md").write_text("x")
    _png(tmp_path / "imgs" / ".ipynb_checkpoints" / "a.png")  # hidden folder: not probed
    err = _dissect_error(_describe(run, tmp_path, "--image_folder", str(tmp_path / "imgs")), capsys)
    assert "contains no images (1 other file(s)); expected files ending in .jpg" in err


def test_dissect_missing_probe_folder(run, tmp_path, capsys):
    err = _dissect_error(_describe(run, tmp_path, "--image_folder", str(tmp_path / "nope")), capsys)
    assert f"probe image folder {str(tmp_path / 'nope')!r} does not exist" in err


def test_dissect_corrupt_image_in_probe_folder(folder, run, clip_args, tmp_path, capsys):
    good = (folder / "rgb1.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])  # truncated download
    err = _dissect_error(_describe(run, tmp_path, "--image_folder", str(folder), *clip_args), capsys)
    assert f"cannot read probe image {str(folder / 'broken.png')!r}" in err
    assert "remove it or convert it to PNG/JPEG" in err
    assert not (tmp_path / "o").exists()


def test_dissect_folder_with_non_images_and_mixed_modes_works(folder, run, clip_args, tmp_path):
    """notes.txt and the hidden ._rgb0.png are skipped; RGBA and grayscale images are converted to RGB."""
    dissect_main(_describe(run, tmp_path, "--image_folder", str(folder), *clip_args))
    import json

    assert json.loads((tmp_path / "o" / "summary.json").read_text())["meta"]["num_images"] == 6


def test_dissect_rgb_images_on_a_one_channel_model(folder, tmp_path, clip_args):
    """A Fashion-MNIST-style model (in_channels=1) probed on RGB/RGBA images: they are converted to L."""
    from lwta_vision.lit import LitClassifier

    lit = LitClassifier("convnet_small", {"widths": [8, 16, 32], "act": "lwta", "act_kwargs": {"competitors": 2}},
                        num_classes=10, in_channels=1)
    torch.save({"state_dict": lit.state_dict(), "hyper_parameters": dict(lit.hparams)}, tmp_path / "gray.ckpt")
    data = '{"class_path": "lwta_vision.data.FashionMNISTDataModule", "init_args": {"data_dir": "/nonexistent"}}'
    summaries = dissect_main(["describe", "--checkpoint", str(tmp_path / "gray.ckpt"), "--data", data,
                              "--layers", "[layer3, fc]", "--image_folder", str(folder),
                              "--output_dir", str(tmp_path / "o"), *clip_args])
    assert summaries["layer3"]["units"] == 32 and summaries["fc"]["units"] == 10


def test_dissect_clip_weights_unreachable_offline(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _describe(run, tmp_path, "--scorer", "clip", "--clip_model", "ViT-B-32", "--clip_pretrained", "openai",
                     "--concepts", "cifar10", "--cache_dir", str(tmp_path / "cache"))
    err = _dissect_error(args, capsys)
    assert "could not fetch the pretrained weights for model_name='ViT-B-32', pretrained='openai'" in err
    assert "pass --clip_checkpoint /path/to/file" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_dissect_top_k_larger_than_the_probe_set_is_clipped(run, tmp_path):
    summaries = dissect_main(_describe(run, tmp_path, "--similarity_kwargs", '{"top_k": 1000}',
                                       "--images_per_unit", "50", "--html", "true"))
    assert summaries["layer3"]["units"] == 128
    assert (tmp_path / "o" / "index.html").is_file()


def test_dissect_output_folder_under_a_file(run, tmp_path, capsys):
    (tmp_path / "somefile").write_text("x")
    args = _describe(run, tmp_path)
    args[args.index("--output_dir") + 1] = str(tmp_path / "somefile" / "out")
    err = _dissect_error(args, capsys)
    assert f"cannot write to --output_dir={str(tmp_path / 'somefile' / 'out')!r}" in err
    assert "is a file, not a folder" in err


@pytest.mark.parametrize("case,expect", [
    ("missing", "does not exist (pass the .ckpt written by train.py"),
    ("truncated", "is not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint)"),
    ("folder", "is a folder; pass the .ckpt file inside it"),
    ("other classes", "does not match architecture 'convnet_small'"),
])
def test_dissect_bad_checkpoint(case, expect, run, tmp_path, capsys):
    path = tmp_path / "x.ckpt"
    if case == "truncated":
        data = run.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "folder":
        path = run.parents[1]
    elif case == "other classes":
        ckpt = torch.load(run, weights_only=False)
        ckpt["hyper_parameters"]["num_classes"] = 10
        torch.save(ckpt, path)
    args = _describe(run, tmp_path)
    args[2] = str(path)
    err = _dissect_error(args, capsys)
    assert expect in err
    assert not (tmp_path / "o").exists()


def test_dissect_ground_truth_scorer_on_an_image_folder(folder, run, tmp_path, capsys):
    err = _dissect_error(_describe(run, tmp_path, "--image_folder", str(folder), "--scorer", "ground_truth"), capsys)
    assert "scorer 'ground_truth' needs a probe set with concept annotations" in err
    assert "use --scorer clip for other data" in err


def test_evaluate_on_a_non_final_layer(run, tmp_path, capsys):
    err = _dissect_error(["evaluate", "--checkpoint", str(run), "--layer", "layer3", "--max_images", "16",
                          "--device", "cpu", "--sentence_model", "null", "--output", str(tmp_path / "m.json")],
                         capsys)
    assert "layer 'layer3' has 128 units but the model has 6 classes; evaluate needs the final (class) layer" in err
    assert not (tmp_path / "m.json").exists()


def test_explain_without_labels(run, tmp_path, capsys):
    img = _png(tmp_path / "x.png")
    err = _dissect_error(["explain", str(img), "--checkpoint", str(run), "--labels_dir", str(tmp_path / "nolabels"),
                          "--device", "cpu"], capsys)
    assert "summary.json not found; run `dissect.py describe --output_dir" in err


def test_explain_corrupt_image(run, labels, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    err = _dissect_error(["explain", str(tmp_path / "x.png"), "--checkpoint", str(run), "--labels_dir", str(labels),
                          "--device", "cpu"], capsys)
    assert f"cannot read image {str(tmp_path / 'x.png')!r}" in err


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_explain_rgba_or_grayscale_image_on_an_rgb_model(mode, run, labels, tmp_path):
    img = _png(tmp_path / "x.png", mode, size=(50, 40))
    res = dissect_main(["explain", str(img), "--checkpoint", str(run), "--labels_dir", str(labels), "--device", "cpu"])
    assert res["prediction"] in ["circle", "square", "triangle", "star", "cross", "ring"]


def test_dissect_lwta_debug_reraises(run, tmp_path, monkeypatch):
    monkeypatch.setenv("LWTA_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown similarity"):
        dissect_main(_describe(run, tmp_path, "--similarity", "nope"))
