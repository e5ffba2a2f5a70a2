"""Scorers (CLIP P matrix on a tiny random CLIP, ground truth) and the tensor cache."""
import os
import warnings

import pytest
import torch
from tiny_clip import random_images, random_probe, register_tiny_clip

from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.cache import TensorCache, cache_key
from lwta_vision.dissect.clip_dissect import CLIPScorer, GroundTruthScorer, Scorer, WeightsUnavailableError

CONCEPTS = ["cat", "dog", "red", "striped", "airplane"]


@pytest.fixture(scope="module")
def tiny():
    return register_tiny_clip()


def _random_scorer(tiny, cache_dir, **kw):
    return CLIPScorer(tiny, pretrained=None, allow_random_weights=True, cache_dir=str(cache_dir), **kw)


@pytest.fixture
def ckpt(tiny, tmp_path):
    """A checkpoint file with fixed random weights, so separate scorers share the weights identity."""
    torch.manual_seed(123)
    path = tmp_path / "tiny.pt"
    torch.save(_random_scorer(tiny, tmp_path / "unused").model.state_dict(), path)
    return str(path)


def _counting(scorer):
    calls = {"images": 0, "texts": 0}
    enc = scorer.encoder
    enc_i, enc_t = enc._encode_images, enc._encode_texts

    def images(probe):
        calls["images"] += 1
        return enc_i(probe)

    def texts(concepts):
        calls["texts"] += 1
        return enc_t(concepts)

    enc._encode_images, enc._encode_texts = images, texts
    return calls


# ----------------------------------------------------------------------------------------------- basics
def test_tiny_clip_builds_offline(tiny):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(tiny, pretrained=None)
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert open_clip.get_tokenizer(tiny)(["a cat"]).shape == (1, 16)


def test_embeddings_normalised_and_similarity_is_cosine(tiny, tmp_path):
    scorer = _random_scorer(tiny, tmp_path)
    assert isinstance(scorer, Scorer)
    probe = random_probe(7)
    img, txt = scorer.image_embeddings(probe), scorer.text_embeddings(CONCEPTS)
    assert img.shape == (7, 32) and txt.shape == (5, 32)
    assert img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(5))
    P = scorer.similarity(probe, CONCEPTS)
    assert P.shape == (7, 5)
    cos = torch.nn.functional.cosine_similarity(img[:, None], txt[None], dim=-1)
    torch.testing.assert_close(P, cos, atol=1e-5, rtol=1e-5)


def test_image_embeddings_match_direct_model_call_and_batching(tiny, tmp_path):
    scorer = _random_scorer(tiny, tmp_path, batch_size=3, use_cache=False)
    probe = random_probe(7)
    x = torch.stack([scorer.preprocess(probe.raw(i)) for i in range(7)])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(scorer.model.encode_image(x), dim=-1)
    torch.testing.assert_close(scorer.image_embeddings(probe), ref, atol=1e-5, rtol=1e-5)


def test_bf16_precision_runs_and_is_close(tiny, ckpt, tmp_path):
    probe = random_probe(4)
    p32 = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(tmp_path)).similarity(probe, CONCEPTS)
    bf = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(tmp_path), precision="bf16")
    calls = _counting(bf)
    p16 = bf.similarity(probe, CONCEPTS)
    assert calls == {"images": 1, "texts": 1}  # precision is part of the key
    assert p16.dtype == torch.float32
    err = (p16 - p32).abs().max().item()
    # bf16 is really used (not ignored), and its error (measured ~0.0025 on four seeds of this tiny CLIP, 8-bit
    # mantissas) stays far below the 0.1-0.3 that separates a present from an absent concept in CLIP
    assert 1e-6 < err < 0.02


# ----------------------------------------------------------------------------------------------- cache
def test_memo_second_call_does_no_work(tiny, tmp_path, monkeypatch):
    scorer = _random_scorer(tiny, tmp_path)
    probe = random_probe(5)
    calls = _counting(scorer)
    first = scorer.similarity(probe, CONCEPTS)
    loads = []
    monkeypatch.setattr(scorer.cache, "load", lambda *a, **k: loads.append(a))
    second = scorer.similarity(probe, CONCEPTS)
    assert calls == {"images": 1, "texts": 1} and loads == []
    torch.testing.assert_close(first, second)


def test_disk_cache_hit_in_new_scorer(tiny, ckpt, tmp_path):
    probe = random_probe(6)
    first = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(tmp_path / "c"))
    c1 = _counting(first)
    P1 = first.similarity(probe, CONCEPTS)
    second = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(tmp_path / "c"))
    c2 = _counting(second)
    P2 = second.similarity(random_probe(6), CONCEPTS)  # a fresh but equal probe set
    assert c1 == {"images": 1, "texts": 1} and c2 == {"images": 0, "texts": 0}
    torch.testing.assert_close(P1, P2)
    names = os.listdir(tmp_path / "c")
    assert len(names) == 2 and all(n.endswith(".pt") and not n.startswith(".") for n in names)  # no temp files


def test_cache_missed_when_weights_change(tiny, ckpt, tmp_path):
    probe = random_probe(5)
    a = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(tmp_path / "c"))
    Pa = a.similarity(probe, CONCEPTS)
    torch.manual_seed(999)
    other = tmp_path / "other.pt"
    torch.save(_random_scorer(tiny, tmp_path / "unused").model.state_dict(), other)
    b = CLIPScorer(tiny, pretrained=None, checkpoint=str(other), cache_dir=str(tmp_path / "c"))
    calls = _counting(b)
    Pb = b.similarity(probe, CONCEPTS)
    assert calls == {"images": 1, "texts": 1}
    assert not torch.allclose(Pa, Pb)


def test_random_weights_keyed_by_tensor_hash(tiny, tmp_path):
    probe = random_probe(4)
    a = _random_scorer(tiny, tmp_path)
    a.similarity(probe, CONCEPTS)
    b = _random_scorer(tiny, tmp_path)  # other random draw -> other key
    calls = _counting(b)
    b.similarity(probe, CONCEPTS)
    assert calls == {"images": 1, "texts": 1}


def test_cache_missed_when_probe_concepts_or_preprocess_change(tiny, ckpt, tmp_path):
    cache = str(tmp_path / "c")
    CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=cache).similarity(random_probe(5), CONCEPTS)

    s = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=cache)
    calls = _counting(s)
    s.similarity(random_probe(5, seed=1), CONCEPTS)  # other pixels
    assert calls == {"images": 1, "texts": 0}
    s.similarity(random_probe(5), CONCEPTS[:-1] + ["boat"])  # other concepts; images cached
    assert calls == {"images": 1, "texts": 1}
    s.similarity(random_probe(5), CONCEPTS[::-1])  # order matters too
    assert calls == {"images": 1, "texts": 2}

    s2 = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=cache, image_mean=(0.5, 0.5, 0.5))
    calls2 = _counting(s2)
    s2.similarity(random_probe(5), CONCEPTS)
    assert calls2 == {"images": 1, "texts": 0}  # preprocessing only affects images


def test_corrupt_cache_file_is_detected_and_recomputed(tiny, ckpt, tmp_path):
    cache = tmp_path / "c"
    probe = random_probe(5)
    P1 = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(cache)).similarity(probe, CONCEPTS)
    files = sorted(cache.iterdir())
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated mid-write
    files[1].write_bytes(b"garbage" * 50)
    s = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(cache))
    calls = _counting(s)
    with pytest.warns(UserWarning, match="unreadable"):
        P2 = s.similarity(probe, CONCEPTS)
    assert calls == {"images": 1, "texts": 1}
    torch.testing.assert_close(P1, P2)
    s3 = CLIPScorer(tiny, pretrained=None, checkpoint=ckpt, cache_dir=str(cache))
    calls3 = _counting(s3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s3.similarity(probe, CONCEPTS)  # rewritten files are valid
    assert calls3 == {"images": 0, "texts": 0}


def test_tensor_cache_roundtrip_rename_and_collision(tmp_path):
    cache = TensorCache(tmp_path)
    parts = {"kind": "x", "n": 3, "list": [1, 2]}
    key = cache_key(**parts)
    assert cache.load(key) is None
    cache.save(key, {"a": torch.arange(3.0)}, parts)
    torch.testing.assert_close(cache.load(key, parts)["a"], torch.arange(3.0))
    # the stored parts must match the ones asked for (what a sha256 collision would look like)
    with pytest.warns(UserWarning, match="collision"):
        assert cache.load(key, {"kind": "y"}) is None
    # a file renamed to another key is rejected and removed
    other = cache_key(kind="other")
    os.replace(cache.path(key), cache.path(other))
    with pytest.warns(UserWarning, match="other inputs"):
        assert cache.load(other) is None
    assert not cache.path(other).exists()
    with pytest.raises(ValueError, match="exact parts"):
        cache.save(key, {"a": torch.zeros(1)}, {"kind": "not the parts"})


def test_tensor_cache_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    cache = TensorCache(tmp_path)
    parts = {"kind": "x"}
    key = cache_key(**parts)
    cache.save(key, {"a": torch.ones(2)}, parts)

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.save(key, {"a": torch.zeros(2)}, parts)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [f"{key}.pt"]
    torch.testing.assert_close(cache.load(key)["a"], torch.ones(2))


def test_default_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LWTA_VISION_CACHE", str(tmp_path / "env"))
    assert TensorCache().root == tmp_path / "env"


# ----------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("wrap", ["plain", "open_clip_ckpt"])
def test_local_checkpoint_loads_same_weights(tiny, tmp_path, wrap):
    ref = _random_scorer(tiny, tmp_path, use_cache=False)
    sd = ref.model.state_dict()
    if wrap == "open_clip_ckpt":  # what open_clip training writes under DDP
        sd = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    loaded = CLIPScorer(tiny, pretrained=None, checkpoint=str(path), use_cache=False)
    probe = random_probe(3)
    torch.testing.assert_close(loaded.image_embeddings(probe), ref.image_embeddings(probe))
    torch.testing.assert_close(loaded.text_embeddings(CONCEPTS), ref.text_embeddings(CONCEPTS))


def test_checkpoint_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        CLIPScorer(tiny, pretrained=None, checkpoint=str(tmp_path / "nope.pt"))
    sd = _random_scorer(tiny, tmp_path, use_cache=False).model.state_dict()
    bad = dict(sd)
    bad.pop("visual.proj")
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"lwta-test-tiny-vit.*visual\.proj.*extra\.weight"):
        CLIPScorer(tiny, pretrained=None, checkpoint=str(tmp_path / "bad.pt"))
    wrong = dict(sd)
    wrong["visual.proj"] = torch.zeros(7, 7)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit architecture 'lwta-test-tiny-vit'"):
        CLIPScorer(tiny, pretrained=None, checkpoint=str(tmp_path / "wrong.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        CLIPScorer(tiny, pretrained=None, checkpoint=str(tmp_path / "junk.pt"))


def test_unreachable_pretrained_weights_raise_one_clear_error(tmp_path):
    import time

    t = time.time()
    with pytest.raises(WeightsUnavailableError, match=r"ViT-B-16.*openai.*checkpoint=") as info:
        CLIPScorer("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path), hub_cache_dir=str(tmp_path / "hub"))
    assert "scorer.init_args.checkpoint" in str(info.value)
    assert time.time() - t < 30


def test_download_failure_of_any_kind_is_wrapped(monkeypatch, tmp_path):
    import urllib.error

    import open_clip

    def fail(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(open_clip, "download_pretrained", fail)
    with pytest.raises(WeightsUnavailableError, match="no route to host"):
        CLIPScorer("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))


def test_configuration_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="random weights.*allow_random_weights"):
        CLIPScorer(tiny, pretrained=None, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="did you mean: .*ViT-B-16"):
        CLIPScorer("ViT-B-61", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown pretrained tag 'not-a-tag'.*openai"):
        CLIPScorer("ViT-B-16", pretrained="not-a-tag", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="precision"):
        CLIPScorer(tiny, pretrained=None, allow_random_weights=True, precision="fp8")


def test_device_auto(tiny, tmp_path):
    s = _random_scorer(tiny, tmp_path, device="auto")
    assert s.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------- ground truth
class _Annotated:
    concept_names = ["red", "circle", "square", "Blue Sky"]

    def __init__(self, n=6):
        self.items = random_images(n)
        g = torch.Generator().manual_seed(0)
        self.presence = (torch.rand(n, 4, generator=g) > 0.5).float()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def presence_matrix(self):
        return self.presence


def test_ground_truth_reorders_and_rejects_unknown():
    ds = _Annotated()
    probe = ProbeSet(ds, transform=lambda x: x, name="annotated")
    gt = GroundTruthScorer.from_dataset(ds)
    P = gt.similarity(probe, ["square", "red", "blue sky"])
    torch.testing.assert_close(P, 0.3 * ds.presence[:, [2, 0, 3]])  # default scale: CLIP-like gaps
    assert torch.allclose(P.unique(), torch.tensor([0.0, 0.3]))
    raw = GroundTruthScorer.from_dataset(ds, scale=1.0).similarity(probe, ["square", "red", "blue sky"])
    torch.testing.assert_close(raw, ds.presence[:, [2, 0, 3]])
    with pytest.raises(KeyError, match="triangle"):
        gt.similarity(probe, ["red", "triangle"])


def test_ground_truth_checks_probe_dataset():
    ds = _Annotated(6)
    gt = GroundTruthScorer.from_dataset(ds)
    with pytest.raises(ValueError, match="same dataset"):
        gt.similarity(ProbeSet(random_images(4), transform=lambda x: x, name="other"), ["red"])
    # a plain presence tensor + names works with any probe set of the right length
    plain = GroundTruthScorer(ds.presence, ds.concept_names)
    assert plain.similarity(ProbeSet(random_images(6), lambda x: x, "p"), ["circle"]).shape == (6, 1)
    with pytest.raises(TypeError, match="presence_matrix"):
        GroundTruthScorer.from_dataset(random_images(3))
