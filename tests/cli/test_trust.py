"""Nothing random without saying so, and errors that are ours and only ours.

- torchvision networks: named weights from a local $TORCH_HOME (no network), ``random`` announced and
  recorded, ``null`` refused; a cached file that is not the weights it is named after is one clear error.
- transformers models whose weights file lacks weights are refused (not silently random-initialised).
- dissect.py: wrong inputs are one ``error:`` line; bugs and resource errors keep their traceback.
- CLIPScorer: a file it cannot read, weights that do not fit, and anything else are three different things.
- GroundTruthScorer: annotations belong to their dataset by identity, not by length.
"""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lwta_vision.dissect.clip_dissect import CLIPScorer, GroundTruthScorer, UnknownConceptError
from lwta_vision.dissect.report import safe_name
from lwta_vision.dissect_cli import main as dissect_main

TV_MODEL = "mobilenet_v3_small"  # the smallest torchvision classifier: ~0.06 GFLOPs at 224 px
CONCEPTS = ["red", "blue", "circle", "square", "stripes", "dots"]


def _one_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        dissect_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    return err


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random-weight CLIP as a local file, and its name (see tests/tiny_clip.py)."""
    import open_clip
    from tiny_clip import register_tiny_clip

    tmp = tmp_path_factory.mktemp("clip")
    name = register_tiny_clip()
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), tmp / "tiny.pt")
    return name, tmp / "tiny.pt"


@pytest.fixture(scope="module")
def probe_env(tiny_clip, tmp_path_factory):
    """A folder of 4 PNGs, a concept file and the dissect.py flags of an offline CLIP scorer."""
    tmp = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    (tmp / "concepts.txt").write_text("\n".join(CONCEPTS) + "\n")
    name, path = tiny_clip
    flags = ["--image_folder", str(tmp / "images"), "--max_images", "4", "--scorer", "clip", "--clip_model", name,
             "--clip_pretrained", "null", "--clip_checkpoint", str(path), "--concepts", str(tmp / "concepts.txt"),
             "--cache_dir", str(tmp / "cache"), "--device", "cpu", "--batch_size", "4"]
    return flags


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    """$TORCH_HOME with the weights file of TV_MODEL's DEFAULT weights, under the name torchvision expects.

    torchvision asks torch.hub for ``check_hash=True``, but torch.hub checks the hash in the file name only
    while downloading: a file already in the cache is loaded as it is, so these (seeded, untrained) weights
    stand in for the real ones.
    """
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    w = torchvision.models.get_model_weights(TV_MODEL).DEFAULT
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(123)
    sd = torchvision.models.get_model(TV_MODEL, weights=None).state_dict()
    torch.save(sd, home / "hub" / "checkpoints" / os.path.basename(w.url))
    return home, sd


def _describe(out, *extra):
    return ["describe", "--torchvision_model", TV_MODEL, "--layers", "[features.12, classifier.3]",
            "--output_dir", str(out), "--html", "false", *extra]


# ------------------------------------------------------------------------------- 4. torchvision weights
def test_named_torchvision_weights_from_a_local_torch_home(torch_home, probe_env, tmp_path, monkeypatch):
    from lwta_vision.dissect_cli.loading import load_torchvision_model as _torchvision_model

    home, sd = torch_home
    monkeypatch.setenv("TORCH_HOME", str(home))
    net, _, classes = _torchvision_model(TV_MODEL, "DEFAULT")
    torch.testing.assert_close(net.state_dict()["classifier.3.weight"], sd["classifier.3.weight"])  # our file
    assert len(classes) == 1000

    out = tmp_path / "out"
    summaries = dissect_main(_describe(out, "--torchvision_weights", "DEFAULT", *probe_env))
    assert summaries["classifier.3"]["units"] == 1000 and summaries["features.12"]["units"] == 576
    rows = list(csv.DictReader(open(out / f"{safe_name('classifier.3')}.csv")))
    assert len(rows) == 1000 and {r["label"] for r in rows if r["label"]} <= set(CONCEPTS)
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["weights"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1" and meta["torchvision_model"] == TV_MODEL


def test_random_weights_are_announced_and_recorded(probe_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # nothing to download, nothing read
    out = tmp_path / "out"
    dissect_main(_describe(out, "--torchvision_weights", "random", *probe_env))
    err = capsys.readouterr().err
    assert "random weights:" in err and "labels describe an untrained network" in err
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["weights"].startswith("random (untrained")

    metrics = dissect_main(["evaluate", "--torchvision_model", TV_MODEL, "--torchvision_weights", "random",
                            "--sentence_model", "null", *probe_env])
    assert metrics["weights"].startswith("random (untrained") and metrics["num_units"] == 1000
    assert "random weights:" in capsys.readouterr().err


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    from lwta_vision.dissect_cli.loading import load_torchvision_model as _torchvision_model

    state = torch.random.get_rng_state()
    a, _, classes = _torchvision_model(TV_MODEL, "random")
    b, _, _ = _torchvision_model(TV_MODEL, "random")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert classes[0] == "tench"  # the architecture's DEFAULT class names: probed like its trained counterpart


def test_null_torchvision_weights_is_one_clear_error(probe_env, tmp_path, capsys):
    err = _one_error(_describe(tmp_path / "out", "--torchvision_weights", "null", *probe_env), capsys)
    assert "--torchvision_weights random" in err and "DEFAULT" in err and "IMAGENET1K_V1" in err
    assert not (tmp_path / "out").exists()


def test_a_cached_torchvision_file_that_does_not_fit_is_one_clear_error(probe_env, tmp_path, capsys,
                                                                         monkeypatch):
    import torchvision

    w = torchvision.models.get_model_weights(TV_MODEL).DEFAULT
    cached = tmp_path / "home" / "hub" / "checkpoints" / os.path.basename(w.url)
    cached.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(2, 2)}, cached)  # another model's weights under this name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    err = _one_error(_describe(tmp_path / "out", "--torchvision_weights", "DEFAULT", *probe_env), capsys)
    assert str(cached) in err and "delete it to download it again" in err
    cached.write_bytes(b"truncated")
    err = _one_error(_describe(tmp_path / "out", "--torchvision_weights", "DEFAULT", *probe_env), capsys)
    assert str(cached) in err and "does not hold" in err


# ------------------------------------------------------------------ 4. transformers models with missing keys
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tiny_hf import build_tiny_causal_lm

    return build_tiny_causal_lm(str(tmp_path_factory.mktemp("hf") / "lm"))


def test_a_transformers_model_missing_weights_is_refused(tiny_lm, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lwta_vision.dissect.dnd.generative import HFSummarizer, IncompleteModelError

    assert HFSummarizer(tiny_lm).model is not None  # intact: loads
    broken = tmp_path / "broken_lm"
    shutil.copytree(tiny_lm, broken)
    sd = load_file(broken / "model.safetensors")
    del sd["transformer.ln_f.weight"]
    save_file(sd, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompleteModelError, match="transformer.ln_f.weight") as info:
        HFSummarizer(str(broken))
    msg = str(info.value)
    assert str(broken) in msg and "1 missing" in msg and "initialise them randomly" in msg
    assert "hf download" in msg and isinstance(info.value, ValueError)  # dissect.py: one error line


# ------------------------------------------------------------------------- 5. errors that are ours, only ours
def _fail_with(monkeypatch, err):
    from lwta_vision.dissect_cli.commands import describe

    def fail(*args, **kwargs):
        raise err

    monkeypatch.setattr(describe, "check_options", fail)  # the first thing describe does after its arguments


@pytest.mark.parametrize("err", [RuntimeError("internal bug"), torch.OutOfMemoryError("CUDA out of memory"),
                                 AssertionError("invariant"), IndexError("list index out of range"),
                                 KeyError("stray key")], ids=lambda e: type(e).__name__)
def test_bugs_and_resource_errors_keep_their_traceback(err, monkeypatch, tmp_path):
    _fail_with(monkeypatch, err)
    with pytest.raises(type(err)) as info:
        dissect_main(_describe(tmp_path / "o"))
    assert info.value is err


def _user_errors():
    from lwta_vision.checkpoints import CheckpointError
    from lwta_vision.dissect.clip_dissect.scorers import WeightsUnavailableError
    from lwta_vision.dissect.dnd.generative import IncompleteModelError, MissingExtraError, SummarizerEndpointError

    return [ValueError("bad value"), FileNotFoundError("no such file"), CheckpointError("bad checkpoint"),
            WeightsUnavailableError("offline"), UnknownConceptError("not annotated"),
            MissingExtraError("pip install"), SummarizerEndpointError("cannot reach"),
            IncompleteModelError("missing weights")]


@pytest.mark.parametrize("err", _user_errors(), ids=lambda e: type(e).__name__)
def test_user_errors_are_one_line(err, monkeypatch, tmp_path, capsys):
    _fail_with(monkeypatch, err)
    assert f"error: {err.args[0]}" in _one_error(_describe(tmp_path / "o"), capsys)


def test_an_error_building_data_shows_our_message(tmp_path, capsys):
    data = '{"class_path": "lwta_vision.data.ConceptDataModule", "init_args": {"image_size": 4}}'
    err = _one_error(["describe", "--torchvision_model", TV_MODEL, "--torchvision_weights", "random",
                      "--layers", "[classifier.3]", "--data", data, "--output_dir", str(tmp_path / "o")], capsys)
    assert "error: image_size must be at least 16, got 4" in err and "Union subtypes" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(tmp_path, capsys):
    err = _one_error(_describe(tmp_path / "o", "--torchvision_weights", "random", "--device", "cuda"), capsys)
    assert "CUDA is not available" in err and "--device cpu" in err


# ------------------------------------------------------------------------------ 5. CLIPScorer's weights file
def test_clip_checkpoint_read_fit_and_bugs_are_told_apart(tiny_clip, tmp_path, monkeypatch):
    name, path = tiny_clip
    sd = torch.load(path, weights_only=True)
    data = path.read_bytes()

    def load(file):
        return CLIPScorer(name, pretrained=None, checkpoint=str(file), use_cache=False)

    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "full.safetensors")
    full = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(full[: len(full) // 2])
    for file, why in [("truncated.pt", "truncated, corrupt or another format"), ("list.pt", "holds a list"),
                      ("no_tensors.pt", "a dict without tensors"),
                      ("truncated.safetensors", "truncated, corrupt or another format")]:
        with pytest.raises(ValueError, match="could not read checkpoint") as info:
            load(tmp_path / file)
        assert why in str(info.value) and file in str(info.value)
    assert load(tmp_path / "full.safetensors").checkpoint.endswith("full.safetensors")  # the intact file loads

    wrong = dict(sd, **{"visual.proj": torch.zeros(7, 7)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"does not fit architecture .*1 shape mismatches \(size mismatch for "
                                         r"visual\.proj") as info:
        load(tmp_path / "wrong.pt")
    assert "could not read" not in str(info.value)
    missing = {k: v for k, v in sd.items() if k != "visual.proj"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"1 missing keys \(e\.g\. \['visual\.proj'\]\)"):
        load(tmp_path / "missing.pt")

    import open_clip

    def bug(*args, **kwargs):
        raise RuntimeError("an internal bug while loading")

    monkeypatch.setattr(open_clip, "load_checkpoint", bug)
    with pytest.raises(RuntimeError, match="an internal bug while loading"):  # not a "could not read"
        load(path)


# --------------------------------------------------------------------- 5. ground truth tied to its dataset
@pytest.fixture(scope="module")
def concept_data():
    from lwta_vision.data import ConceptDataModule

    dm = ConceptDataModule(num_train=16, num_val=24, num_test=24, image_size=32)
    return dm.probe_set("val"), dm.probe_set("test")


def test_ground_truth_refuses_another_dataset_of_the_same_length(concept_data):
    val, test = concept_data
    assert len(val) == len(test)
    gt = GroundTruthScorer.from_dataset(val.dataset)
    with pytest.raises(ValueError, match="same dataset") as info:
        gt.similarity(test, ["red"])
    msg = str(info.value)
    assert "split 'test'" in msg and "split 'val'" in msg and "GroundTruthScorer.from_dataset(probe.dataset)" in msg
    with pytest.raises(ValueError, match="same dataset"):  # a view of the other split too
        gt.similarity(test.first(8), ["red"])


def test_ground_truth_serves_its_dataset_and_views_of_it(concept_data):
    val, _ = concept_data
    names = list(val.dataset.concept_names)
    full = GroundTruthScorer.from_dataset(val.dataset).similarity(val, names)
    assert full.shape == (len(val), len(names))
    first = val.first(8)
    torch.testing.assert_close(GroundTruthScorer.from_dataset(val.dataset).similarity(first, names), full[:8])
    # as dissect.py, the callback and the benchmarks build it: from the (possibly shortened) probe's dataset
    torch.testing.assert_close(GroundTruthScorer.from_dataset(first.dataset).similarity(first, names), full[:8])
    torch.testing.assert_close(GroundTruthScorer.from_dataset(first.dataset).similarity(first.first(4), names),
                               full[:4])
    with pytest.raises(ValueError, match="has 24 images but the annotations cover 8"):
        GroundTruthScorer.from_dataset(first.dataset).similarity(val, names)
    # a plain presence matrix has no dataset to check: any probe set of its length
    plain = GroundTruthScorer(val.dataset.presence_matrix(), names)
    assert plain.similarity(concept_data[1], ["red"]).shape == (24, 1)


def test_unknown_concepts_are_a_value_error_that_is_still_a_key_error(concept_data):
    val, _ = concept_data
    gt = GroundTruthScorer.from_dataset(val.dataset)
    with pytest.raises(UnknownConceptError) as info:
        gt.similarity(val, ["red", "zebra"])
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("1 concepts are not annotated in the dataset: 'zebra'")
