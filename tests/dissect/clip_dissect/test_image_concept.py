"""The lazy image-concept matrix: labels from embeddings equal the labels of the dense definition."""
import math

import pytest
import torch

from lwta_vision.dissect.clip_dissect import EmbeddingProduct, label_layer
from lwta_vision.dissect.clip_dissect.image_concept import as_dense, columns_of, rows_of
from lwta_vision.dissect.clip_dissect.similarity import SIMILARITIES, soft_wpmi, soft_wpmi_reference
from lwta_vision.dissect.recording import LayerRecord


def _embeddings(n, m, seed, d=32, lean=0.6, shown=8):
    """CLIP-like unit embeddings: image i leans towards word i % shown and one random word."""
    g = torch.Generator().manual_seed(seed)
    words = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    picks = torch.randint(0, m, (n, 2), generator=g)
    picks[:, 0] = torch.arange(n) % shown
    images = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) + lean * words[picks].sum(1)
    return torch.nn.functional.normalize(images, dim=1), words, picks


def _planted_activations(picks, k, m, seed):
    """Neuron j fires on the images that show word j, plus noise: word j is its label."""
    g = torch.Generator().manual_seed(seed)
    shows = torch.zeros(picks.shape[0], m).scatter_(1, picks, 1.0)
    return shows[:, :k] * 3 + 0.3 * torch.randn(picks.shape[0], k, generator=g)


def test_rows_columns_and_dense_are_the_product():
    images, words, _ = _embeddings(50, 20, 0)
    p = EmbeddingProduct(images, words)
    dense = images @ words.T
    idx = torch.tensor([3, 0, 3, 49])
    assert p.shape == (50, 20) and torch.equal(as_dense(p), dense)
    torch.testing.assert_close(rows_of(p, idx), dense[idx], atol=1e-6, rtol=0)
    torch.testing.assert_close(columns_of(p, idx[:3]), dense[:, idx[:3]], atol=1e-6, rtol=0)
    assert torch.equal(rows_of(dense, idx), dense[idx]) and torch.equal(columns_of(dense, idx[:3]), dense[:, idx[:3]])
    with pytest.raises(ValueError, match="same d"):
        EmbeddingProduct(images, words[:, :5])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_wpmi_from_embeddings_equals_the_float64_definition_at_20k_concepts(seed):
    n, k, m = 240, 12, 20_000
    images, words, picks = _embeddings(n, m, seed, shown=k)  # 20 images show each of the first k words
    acts = _planted_activations(picks, k, m, seed)
    lazy = soft_wpmi(acts, EmbeddingProduct(images, words), top_k=20, chunk_size=37)
    definition = soft_wpmi_reference(acts, images @ words.T, top_k=20, dtype=torch.float64)
    torch.testing.assert_close(lazy, definition, atol=1e-4, rtol=0)  # P's float32 rounding, far below ties
    assert torch.equal(lazy.argmax(1), definition.argmax(1))
    top2 = definition.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2  # the labels do not hang on a near tie
    assert torch.equal(lazy.argmax(1), torch.arange(k))  # and they are the planted words


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_every_similarity_takes_the_lazy_matrix(name):
    images, words, picks = _embeddings(120, 30, 3)
    acts = _planted_activations(picks, 6, 30, 3)
    fn = SIMILARITIES[name]
    lazy, dense = fn(acts, EmbeddingProduct(images, words)), fn(acts, images @ words.T)
    torch.testing.assert_close(lazy, dense, atol=1e-5, rtol=1e-5)


def _record(acts):
    k = acts.shape[1]
    top = acts.topk(10, dim=0)
    return LayerRecord(name="fc", pooled=acts, top_values=top.values, top_indices=top.indices,
                       win_rate=torch.full((k,), 0.5), input_rate=torch.full((k,), 0.5), spatial=False)


def test_label_layer_gives_the_same_labels_and_quality_from_embeddings():
    images, words, picks = _embeddings(200, 40, 4)
    acts = _planted_activations(picks, 8, 40, 4)
    concepts = [f"w{j}" for j in range(40)]
    kw = {"top_k": 20}  # 25 images show each planted word
    lazy = label_layer(_record(acts), EmbeddingProduct(images, words), concepts, similarity_kwargs=kw)
    dense = label_layer(_record(acts), images @ words.T, concepts, similarity_kwargs=kw)
    assert lazy.labels == dense.labels == concepts[:8]
    for a, b in zip(lazy.rows, dense.rows):
        assert a.decided_by == b.decided_by
        for key in ("score", "label_corr", "label_auprc", "label_base_rate"):
            va, vb = getattr(a, key), getattr(b, key)
            assert (va is None and vb is None) or math.isclose(va, vb, rel_tol=1e-5, abs_tol=1e-6), key


def test_clip_scorers_give_labeling_their_embeddings_and_the_callback_keeps_them(tmp_path):
    from tiny_clip import random_probe, register_tiny_clip

    from lwta_vision.callbacks import NeuronDissection
    from lwta_vision.dissect.clip_dissect import CLIPScorer, GroundTruthScorer

    scorer = CLIPScorer(register_tiny_clip(), pretrained=None, allow_random_weights=True, cache_dir=str(tmp_path))
    probe, words = random_probe(6), ["red", "dog", "striped"]
    p = scorer.image_concept(probe, words)
    assert isinstance(p, EmbeddingProduct) and p.shape == (6, 3)
    torch.testing.assert_close(p.dense(), scorer.similarity(probe, words), atol=1e-6, rtol=0)
    # the epoch-end callback keeps the embeddings (N x d + M x d), not the N x M matrix
    callback = NeuronDissection(layers=["fc"], scorer=scorer, probe=probe, concepts=str(_words_file(tmp_path, words)))
    callback._ensure_concepts(None)
    assert isinstance(callback._image_concept, EmbeddingProduct)
    # a dense scorer keeps handing its matrix over
    gt = GroundTruthScorer(torch.eye(6)[:, :3], ["a", "b", "c"])
    assert isinstance(gt.image_concept(probe, ["a", "b"]), torch.Tensor)


def _words_file(tmp_path, words):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(words) + "\n")
    return path
