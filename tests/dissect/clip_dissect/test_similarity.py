"""Similarity functions: soft-WPMI against its formula, bounded memory, validation, sanity of the others."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lwta_vision.dissect.clip_dissect.similarity import (
    SIMILARITIES,
    cos_similarity,
    cos_similarity_cubed,
    get_similarity,
    rank_reorder,
    soft_wpmi,
    soft_wpmi_reference,
    wpmi,
)


def _random_inputs(n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    activations = torch.randn(n, k, generator=g)
    sims = 0.15 + 0.1 * torch.randn(n, m, generator=g)  # CLIP-like cosine similarities
    return activations, sims


def _formula_soft_wpmi(activations, sims, top_k, a=10.0, lam=1.0, p_start=0.998, p_end=0.97, min_prob=1e-7):
    """ALGORITHMS.md written out neuron by neuron, float64."""
    n, k_neurons = activations.shape
    top_k = min(top_k, n)
    probs = torch.softmax(a * sims.double(), dim=1)
    weights = torch.tensor([p_start - (r / top_k) * (p_start - p_end) for r in range(top_k)], dtype=torch.float64)
    log_pk = torch.zeros(k_neurons, sims.shape[1], dtype=torch.float64)
    for neuron in range(k_neurons):
        images = torch.argsort(activations[:, neuron], descending=True, stable=True)[:top_k]
        log_pk[neuron] = torch.log(1 + weights[:, None] * (probs[images] - 1) + min_prob).sum(dim=0)
    log_pt = torch.logsumexp(log_pk, dim=0) - math.log(k_neurons)
    return log_pk - lam * log_pt


# ---------------------------------------------------------------------------------------------- soft-WPMI
@pytest.mark.parametrize(
    "n,k,m,top_k,chunk_size,seed",
    [
        (64, 8, 13, 10, 4096, 0),
        (64, 8, 13, 10, 3, 1),  # many chunks, pairs split across batches
        (40, 5, 7, 100, 4096, 2),  # top_k > N: clipped
        (300, 24, 50, 100, 17, 3),
        (5, 3, 4, 5, 1, 4),  # every image in every top-k, chunk of one row
    ],
)
def test_soft_wpmi_matches_reference_and_formula(n, k, m, top_k, chunk_size, seed):
    activations, sims = _random_inputs(n, k, m, seed)
    fast = soft_wpmi(activations, sims, top_k=top_k, chunk_size=chunk_size)
    ref = soft_wpmi_reference(activations, sims, top_k=top_k)
    assert fast.shape == (k, m)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref, _formula_soft_wpmi(activations, sims, top_k), atol=1e-5, rtol=0)
    assert torch.equal(fast.argmax(1), ref.argmax(1))


def test_soft_wpmi_non_default_hyperparameters_match_reference():
    activations, sims = _random_inputs(80, 6, 20, 5)
    kwargs = dict(top_k=15, a=3.0, lam=0.5, p_start=0.9, p_end=0.5, min_prob=1e-5)
    torch.testing.assert_close(
        soft_wpmi(activations, sims, chunk_size=7, **kwargs),
        soft_wpmi_reference(activations, sims, **kwargs),
        atol=1e-5,
        rtol=0,
    )


def test_soft_wpmi_float32_inputs_float32_compute_close():
    activations, sims = _random_inputs(100, 4, 30, 6)
    fast = soft_wpmi(activations, sims, top_k=20, dtype=torch.float32)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), soft_wpmi_reference(activations, sims, top_k=20), atol=1e-3, rtol=0)


@pytest.mark.parametrize("fn", [soft_wpmi, soft_wpmi_reference])
def test_single_neuron_with_lam_one_scores_zero(fn):
    activations, sims = _random_inputs(50, 1, 9, 7)
    scores = fn(activations, sims, top_k=10)
    assert scores.shape == (1, 9)
    assert torch.allclose(scores, torch.zeros_like(scores), atol=1e-9)


def _planted_concepts(n=400, k=6, m=12, top_k=20, seed=0):
    """Neuron i's top images show concept 2i strongly; the concept is absent from every other image."""
    g = torch.Generator().manual_seed(seed)
    activations = torch.rand(n, k, generator=g)
    sims = 0.2 + 0.01 * torch.randn(n, m, generator=g)
    shown = torch.randperm(n, generator=g)[: k * top_k].view(k, top_k)  # disjoint image sets
    for neuron in range(k):
        images = shown[neuron]
        activations[images, :] = 0.0
        activations[images, neuron] = 2.0 + torch.rand(top_k, generator=g)
        sims[images, 2 * neuron] = 0.35
    return activations, sims


@pytest.mark.parametrize("fn", [soft_wpmi, soft_wpmi_reference, wpmi])
def test_planted_concept_is_the_label(fn):
    activations, sims = _planted_concepts()
    labels = fn(activations, sims, top_k=20).argmax(dim=1)
    assert labels.tolist() == [2 * i for i in range(6)]


class _LargestOutput(TorchDispatchMode):
    """Records the largest floating-point tensor (numel) any aten op allocates; views are free. With ``width``,
    only tensors whose last dimension is ``width`` (one value per concept) count."""

    def __init__(self, width=None):
        super().__init__()
        self.largest, self.width = 0, width

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t._is_view() and (
                    self.width is None or (t.ndim and t.shape[-1] == self.width)):
                self.largest = max(self.largest, t.numel())
        return out


def test_soft_wpmi_never_materialises_full_softmax():
    n, m, k, top_k, chunk = 50_000, 2000, 8, 10, 64
    g = torch.Generator().manual_seed(0)
    activations = torch.randn(n, k, generator=g)
    # A broadcast view: [N, M] to the function, but only M floats of real storage.
    sims = (0.2 + 0.05 * torch.randn(1, m, generator=g)).expand(n, m)
    recorder, wide = _LargestOutput(), _LargestOutput(width=m)
    with recorder, wide:
        scores = soft_wpmi(activations, sims, top_k=top_k, chunk_size=chunk)
    assert scores.shape == (k, m)
    assert torch.isfinite(scores).all()
    # softmax rows and gathered pairs come in chunks of `chunk` rows: never N x M, nor K x top_k x M
    assert wide.largest <= chunk * m < k * top_k * m
    assert recorder.largest <= max(chunk * m, n * k)  # the ranking's masks: the activations' size, N x K


def test_soft_wpmi_runs_on_the_inputs_device_and_returns_there():
    activations, sims = _random_inputs(30, 3, 5, 8)
    assert soft_wpmi(activations, sims, top_k=5).device == activations.device


# ---------------------------------------------------------------------------------------------- WPMI
def test_wpmi_matches_its_formula():
    activations, sims = _random_inputs(90, 7, 11, 9)
    top_k, a, lam, min_prob = 28, 2.0, 0.6, 1e-7
    probs = torch.softmax(a * sims.double(), dim=1)
    top = torch.topk(activations, top_k, dim=0).indices  # [top_k, K]
    log_pk = torch.log(probs[top.T] + min_prob).sum(dim=1)
    expected = log_pk - lam * (torch.logsumexp(log_pk, dim=0) - math.log(activations.shape[1]))
    torch.testing.assert_close(wpmi(activations, sims, chunk_size=5), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(wpmi(activations, sims), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- cosine family
def _with_copied_column(n=200, k=5, m=9, seed=10):
    g = torch.Generator().manual_seed(seed)
    activations = torch.randn(n, k, generator=g)
    sims = torch.randn(n, m, generator=g)
    pairs = {0: 4, 2: 7, 3: 1}  # neuron -> concept that copies it
    for neuron, concept in pairs.items():
        sims[:, concept] = activations[:, neuron]
    return activations, sims, pairs


@pytest.mark.parametrize("fn", [cos_similarity, cos_similarity_cubed, rank_reorder])
def test_concept_equal_to_activation_scores_best(fn):
    activations, sims, pairs = _with_copied_column()
    scores = fn(activations, sims, chunk_size=4)
    assert scores.shape == (5, 9)
    labels = scores.argmax(dim=1)
    for neuron, concept in pairs.items():
        assert labels[neuron] == concept


def test_cos_similarity_values():
    activations, sims, pairs = _with_copied_column()
    scores = cos_similarity(activations, sims)
    expected = torch.nn.functional.normalize(activations, dim=0).T @ torch.nn.functional.normalize(sims, dim=0)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert torch.allclose(scores[0, 4], torch.tensor(1.0), atol=1e-5)
    assert scores.abs().max() <= 1 + 1e-5


def test_cos_similarity_cubed_values():
    activations, sims, _ = _with_copied_column()

    def cube(x):
        x = (x - x.mean(0, keepdim=True)) ** 3
        return x / x.norm(dim=0, keepdim=True)

    torch.testing.assert_close(
        cos_similarity_cubed(activations, sims, chunk_size=2), cube(activations).T @ cube(sims), atol=1e-5, rtol=0
    )


def test_rank_reorder_perfect_ranking_scores_zero_and_reversed_is_worse():
    g = torch.Generator().manual_seed(11)
    activations = torch.randn(100, 1, generator=g)
    sims = torch.stack([activations[:, 0], -activations[:, 0], torch.randn(100, generator=g)], dim=1) + 10
    scores = rank_reorder(activations, sims, top_k=20, scale_p=0.0)
    assert scores[0, 0] == 0
    assert scores[0, 1] < scores[0, 2] < 0  # reversed order is worse than a random one
    # invariant to rescaling the activations (normalised by the random-order error)
    torch.testing.assert_close(rank_reorder(activations * 7.0, sims, top_k=20, scale_p=0.0), scores)


def test_rank_reorder_default_top_fraction_and_chunks_agree():
    activations, sims = _random_inputs(400, 3, 10, 12)
    full = rank_reorder(activations, sims)  # top 5% = 20 images
    torch.testing.assert_close(rank_reorder(activations, sims, top_k=20, chunk_size=3), full)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_mismatched_image_counts_name_both_shapes(name):
    fn = get_similarity(name)
    with pytest.raises(ValueError, match=r"\(10, 3\).*\(11, 4\)"):
        fn(torch.randn(10, 3), torch.randn(11, 4))


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_non_2d_inputs_rejected(name):
    fn = get_similarity(name)
    with pytest.raises(ValueError, match="activations must be 2-D"):
        fn(torch.randn(10, 3, 2), torch.randn(10, 4))
    with pytest.raises(ValueError, match="image_concept_sim must be 2-D"):
        fn(torch.randn(10, 3), torch.randn(10))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["activations", "image_concept_sim"])
def test_non_finite_inputs_rejected(bad, which):
    activations, sims = torch.randn(10, 3), torch.randn(10, 4)
    (activations if which == "activations" else sims)[7, 1] = bad
    with pytest.raises(ValueError, match=f"{which} contains non-finite"):
        soft_wpmi(activations, sims, top_k=3)


def test_bad_hyperparameters_rejected():
    activations, sims = torch.randn(10, 3), torch.randn(10, 4)
    with pytest.raises(ValueError, match="top_k"):
        soft_wpmi(activations, sims, top_k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        soft_wpmi(activations, sims, chunk_size=0)
    with pytest.raises(ValueError, match="p_start"):
        soft_wpmi(activations, sims, p_start=1.5)
    with pytest.raises(ValueError, match="empty"):
        soft_wpmi(torch.randn(10, 0), sims)
    with pytest.raises(TypeError, match="floating-point"):
        soft_wpmi(activations, torch.ones(10, 4, dtype=torch.long))


def test_integer_activations_are_accepted():
    activations, sims = _planted_concepts()
    torch.testing.assert_close(
        soft_wpmi((activations * 100).long(), sims, top_k=20).argmax(1),
        soft_wpmi(activations, sims, top_k=20).argmax(1),
    )


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_lookup():
    assert set(SIMILARITIES) == {"soft_wpmi", "wpmi", "cos_similarity", "cos_similarity_cubed", "rank_reorder"}
    assert get_similarity("soft_wpmi") is soft_wpmi
    assert get_similarity(wpmi) is wpmi
    with pytest.raises(ValueError, match="unknown similarity 'softwpmi'; available: soft_wpmi, wpmi"):
        get_similarity("softwpmi")
