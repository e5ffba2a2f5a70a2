"""The concept CLIP: shipped weights that are what they claim, loaded every way a user loads a CLIP.

Also the open_clip paths no other test reaches: a pretrained tag resolved from a pre-populated local
Hugging Face cache under HF_HUB_OFFLINE=1, and a checkpoint file named by its tag (the README's offline
recommendation), both on a real architecture (RN50) with weights made here.
"""
import hashlib
import json
import os
import stat

import numpy as np
import pytest
import torch

from lwta_vision import concept_clip
from lwta_vision.concept_clip.captions import CONCEPT_WORDS, caption, describes, scene_facts, word_requirements
from lwta_vision.concept_clip.scorer import ConceptCLIPScorer
from lwta_vision.concept_clip.train import build_images, zero_shot_accuracy
from lwta_vision.concept_clip.train import main as train_main
from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.datasets.shapes import ShapesConceptDataset
from lwta_vision.dissect.clip_dissect.clip import CLIPScorer


def _open_clip_model(path):
    import open_clip

    name = concept_clip.register()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def test_shipped_weights_are_the_ones_their_provenance_describes():
    path = concept_clip.weights_path()
    prov = concept_clip.provenance()
    assert path.stat().st_size <= 10_000_000 and prov["bytes"] == path.stat().st_size
    assert hashlib.sha256(path.read_bytes()).hexdigest() == prov["sha256"]
    assert prov["train"]["split"] == "clip" and prov["model_name"] == concept_clip.MODEL_NAME
    assert min(prov["zero_shot"][a] for a in ("shape", "colour", "texture")) >= 0.95, prov["zero_shot"]


@pytest.mark.parametrize("size", [32, 64])
def test_shipped_concept_clip_knows_shapes_colours_and_textures_zero_shot(size):
    """On held-out images of a seed the training never used, at both probe sizes."""
    model, preprocess, tokenizer = _open_clip_model(concept_clip.weights_path())
    x, atoms, _, labels = build_images(600, seed=4242, image_sizes=(size,), preprocess=preprocess)
    acc = zero_shot_accuracy(model, tokenizer, x, atoms, labels)
    assert acc["colour"] >= 0.97 and acc["texture"] >= 0.97, acc
    assert acc["shape"] >= 0.9, acc


def test_clip_stream_never_shows_an_image_of_the_network_splits():
    def digests(split, n):
        ds = ShapesConceptDataset(n, 32, seed=0, split=split)
        return {hashlib.sha1(ds.image(i).tobytes()).hexdigest() for i in range(n)}

    clip = digests("clip", 300)
    for split in ("train", "val", "test"):
        assert not clip & digests(split, 300)


def test_captions_are_true_of_their_image_and_words_match_presence():
    rng = np.random.default_rng(0)
    ds = ShapesConceptDataset(60, 32, seed=7, split="clip")
    facts = [scene_facts(ds._scene(i)) for i in range(len(ds))]
    atoms = np.stack([f.atoms() for f in facts])
    caps = [caption(rng, f) for f in facts]
    truth = describes(np.stack([r for _, r in caps]), atoms)
    assert truth.diagonal().all()  # every caption describes its own image
    assert 0 < truth.mean() < 1  # and not every other image
    # a single concept word is true of exactly the images the dataset annotates with that concept
    word_truth = describes(word_requirements(), atoms)  # [images, 18 words]
    np.testing.assert_array_equal(word_truth, ds.presence_matrix().numpy() > 0)
    assert ds.concept_names == list(CONCEPT_WORDS)


def test_loaded_through_clipscorer_and_through_open_clip_alike(tmp_path):
    """CLIPScorer(model_name=..., checkpoint=...) and ConceptCLIPScorer give open_clip's own embeddings."""
    path = concept_clip.weights_path()
    model, preprocess, tokenizer = _open_clip_model(path)
    ds = ShapesConceptDataset(20, 32, seed=5, split="val")
    probe = ProbeSet(ds, transform=lambda img: img, name="t")
    sc = CLIPScorer(model_name=concept_clip.MODEL_NAME, pretrained=None, checkpoint=str(path), cache_dir=str(tmp_path))
    cc = ConceptCLIPScorer(cache_dir=str(tmp_path / "b"))
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(ds[i][0]) for i in range(20)])),
                                                dim=-1)
        ref_txt = torch.nn.functional.normalize(model.encode_text(tokenizer(list(CONCEPT_WORDS))), dim=-1)
    for s in (sc, cc):
        torch.testing.assert_close(s.image_embeddings(probe), ref_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.text_embeddings(list(CONCEPT_WORDS)), ref_txt, atol=1e-5, rtol=0)
    assert cc.concept_names == list(CONCEPT_WORDS)


def test_missing_weights_name_the_command_that_makes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(concept_clip, "_weights_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m lwta_vision.concept_clip --out DIR"):
        ConceptCLIPScorer()


def test_training_command_writes_weights_that_load(tmp_path, capsys):
    rec = train_main(["--out", str(tmp_path), "--num_images", "256", "--image_epochs", "1", "--text_epochs", "1",
                      "--num_eval", "64", "--batch_size", "128"])
    weights = tmp_path / concept_clip.WEIGHTS_FILE
    assert json.loads((tmp_path / concept_clip.PROVENANCE_FILE).read_text())["sha256"] == rec["sha256"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == rec["sha256"]
    assert set(rec["zero_shot"]) == {"shape", "colour", "texture", "class"}
    assert not list(tmp_path.glob(".*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask  # package data: not private to its writer
    sc = ConceptCLIPScorer(checkpoint=str(weights), use_cache=False)
    assert sc.text_embeddings(["red"]).shape == (1, 64)
    assert "zero-shot" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path), "--image_epochs", "0"])


@pytest.mark.slow
def test_full_training_reaches_the_target(tmp_path):
    rec = train_main(["--out", str(tmp_path)])
    assert min(rec["zero_shot"][a] for a in ("shape", "colour", "texture")) >= 0.95, rec["zero_shot"]


# ----------------------------------------------------------------- real open_clip architectures, offline
@pytest.fixture(scope="module")
def rn50_weights(tmp_path_factory):
    """Random RN50 weights saved the way open_clip's hub files are (safetensors), and their embeddings."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("RN50", pretrained=None, force_quick_gelu=True)
    path = tmp_path_factory.mktemp("rn50") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


def _hf_cache_with(cache, repo_id, path):
    """Lay a file out as huggingface_hub's cache does: refs/main -> snapshots/<revision>/<file>."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (snap / path.name).symlink_to(path)
    return cache


def _embeddings_equal(scorer, model, tmp_path):
    from PIL import Image

    images = [(Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)), 0) for i in range(3)]
    probe = ProbeSet(images, transform=lambda img: img, name="rn50-probe")
    with torch.no_grad():
        ref = torch.nn.functional.normalize(
            model.encode_image(torch.stack([scorer.preprocess(img) for img, _ in images])), dim=-1)
    torch.testing.assert_close(scorer.image_embeddings(probe), ref, atol=1e-4, rtol=0)


def test_pretrained_tag_resolves_from_a_local_hugging_face_cache_offline(rn50_weights, tmp_path, monkeypatch):
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, model = rn50_weights
    repo_id = open_clip.get_pretrained_cfg("RN50", "openai")["hf_hub"].rstrip("/")
    cache = _hf_cache_with(tmp_path / "hub", repo_id, path)
    sc = CLIPScorer(model_name="RN50", pretrained="openai", hub_cache_dir=str(cache), cache_dir=str(tmp_path / "c"))
    assert sc.weights["source"] == "tag" and sc.quick_gelu
    _embeddings_equal(sc, model, tmp_path)
    # an empty cache fails with the one clear message, never a random init
    from lwta_vision.dissect.clip_dissect.scorers import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="checkpoint=/path/to/file"):
        CLIPScorer(model_name="RN50", pretrained="openai", hub_cache_dir=str(tmp_path / "empty"))


def test_checkpoint_named_by_its_tag_uses_the_tags_preprocessing(rn50_weights, tmp_path):
    import open_clip

    path, model = rn50_weights
    sc = CLIPScorer(model_name="RN50", pretrained="openai", checkpoint=str(path), cache_dir=str(tmp_path))
    assert sc.weights["source"] == "file" and sc.quick_gelu
    norm = sc.preprocess.transforms[-1]
    assert tuple(norm.mean) == open_clip.OPENAI_DATASET_MEAN and tuple(norm.std) == open_clip.OPENAI_DATASET_STD
    _embeddings_equal(sc, model, tmp_path)
