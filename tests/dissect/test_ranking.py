"""Top images that never depend on the order of the probe: the ranking rule, on LWTA-like activations.

An LWTA unit is exactly 0 wherever it lost, so most of its values tie. These tests use such activations (each
unit non-zero on ~4% of the images, as at U=24), never randn, which never ties.
"""
import math

import pytest
import torch

from lwta_vision.dissect.clip_dissect.labeling import label_layer
from lwta_vision.dissect.clip_dissect.similarity import rank_reorder, soft_wpmi, soft_wpmi_reference, wpmi
from lwta_vision.dissect.ranking import top_images, top_membership, zeros_excluded
from lwta_vision.dissect.recording import LayerRecord

N, K, M = 1000, 48, 60


def lwta_like(seed, n=N, k=K, m=M, rate=0.04):
    """[n, k] activations that are 0 except on ~rate of the images, and an [n, m] CLIP-like similarity."""
    g = torch.Generator().manual_seed(seed)
    fires = torch.rand(n, k, generator=g) < rate
    acts = torch.where(fires, torch.rand(n, k, generator=g) + 0.1, torch.zeros(n, k))
    sims = 0.15 + 0.1 * torch.randn(n, m, generator=g)
    return acts, sims


def _naive_soft_wpmi(acts, sims, top_k=100, a=10.0, p_start=0.998, p_end=0.97, min_prob=1e-7):
    """CLIP-Dissect's own formulation (torch.topk, ties in whatever order it leaves them)."""
    probs = torch.softmax(a * sims.double(), dim=1)
    idx = torch.topk(acts, top_k, dim=0).indices
    w = torch.tensor([p_start - (r / top_k) * (p_start - p_end) for r in range(top_k)], dtype=torch.float64)
    log_pk = torch.log(1 + w[None, :, None] * (probs[idx.T] - 1) + min_prob).sum(1)
    return log_pk - (torch.logsumexp(log_pk, 0) - math.log(acts.shape[1]))


def _permuted(acts, sims, seed):
    perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(1000 + seed))
    return acts[perm], sims[perm]


def test_the_data_tie_and_the_naive_top_k_depends_on_their_order():
    # guards the tests below: on these activations CLIP-Dissect's own top-k picks among zeros, so the order of
    # the images changes labels (measured on the setup: 132 of 240 labels over five orders)
    acts, sims = lwta_like(0)
    assert float((acts > 0).float().mean()) == pytest.approx(0.04, abs=0.01)
    base = _naive_soft_wpmi(acts, sims).argmax(1)
    changed = sum(int((_naive_soft_wpmi(*_permuted(acts, sims, s)).argmax(1) != base).sum()) for s in range(3))
    assert changed > K // 2


@pytest.mark.parametrize("fn", [soft_wpmi, wpmi, rank_reorder], ids=lambda f: f.__name__)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_and_scores_do_not_depend_on_the_order_of_the_images(fn, seed):
    acts, sims = lwta_like(seed)
    kwargs = {"top_k": 50} if fn is rank_reorder else {}
    base = fn(acts, sims, **kwargs)
    for s in range(3):
        other = fn(*_permuted(acts, sims, s), **kwargs)
        torch.testing.assert_close(other, base, rtol=0, atol=1e-9)  # float summation order only
        assert torch.equal(other.argmax(1), base.argmax(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_labels_in_float32_and_float64_and_with_one_or_two_threads(seed):
    acts, sims = lwta_like(seed)
    ref = soft_wpmi(acts.double(), sims.double())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = soft_wpmi(acts, sims)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(2)
    try:
        two = soft_wpmi(acts, sims)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(two, ref, rtol=0, atol=1e-9)
    assert torch.equal(one.argmax(1), ref.argmax(1)) and torch.equal(two.argmax(1), ref.argmax(1))
    # float32 arithmetic: the same label wherever float64's best leads the runner-up by more than rounding
    # could move it (1e-2 nats against float32's ~1e-4 on these ~100-term sums)
    single = soft_wpmi(acts, sims, dtype=torch.float32).double()
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2
    assert int(clear.sum()) >= 0.75 * K  # measured 39-47 of 48 on seeds 0-5
    assert torch.equal(single.argmax(1)[clear], ref.argmax(1)[clear])
    assert float((single - ref).abs().max()) < 1e-2  # measured <= 2.7e-4 on seeds 0-5


def test_soft_wpmi_equals_the_direct_formula_with_ties_of_every_kind():
    acts, sims = lwta_like(3, n=300, k=8, m=12, rate=0.1)
    acts[:, 1] = 0.5  # constant: every image shares the top-k
    acts[:150, 2] = acts[:150, 2] + 0.3  # a tie of 0.3 above the zeros, cut by the top-k boundary
    acts[150:200, 6] = -0.5 - torch.rand(50)  # negative values below the zeros: candidates, the zeros are not
    acts[:, 3] = torch.where(acts[:, 3] > 0, torch.tensor(0.7), torch.tensor(0.0))  # one tie above the floor
    acts[:120, 4] = 2.0  # a tie group cut by the top-k boundary (120 images at the top, k = 100)
    acts[:, 5] = torch.arange(300.0)  # no ties (a unique floor is an image like any other)
    for lam in (1.0, 0.0):
        torch.testing.assert_close(soft_wpmi(acts, sims, lam=lam), soft_wpmi_reference(acts, sims, lam=lam),
                                   rtol=0, atol=1e-8)


def test_membership_fills_top_k_slots_and_leaves_out_the_zeros():
    acts, _ = lwta_like(4, n=500, k=6, rate=0.05)
    acts[:, 1] = 0.0
    acts[:7, 1] = 1.0  # fires on 7 images only
    acts[:, 2] = 3.0  # constant
    acts[:130, 3] = 5.0  # 130 tied at the top
    acts[400:, 4] = -torch.rand(100) - 0.1  # wins with negative values on 100 images
    m = top_membership(acts, 100, 0.998, 0.97)
    excluded = zeros_excluded(acts)
    assert excluded.tolist() == [True, True, False, True, True, True]
    for u in range(acts.shape[1]):
        sel = m.unit == u
        images, mass = m.image[sel], m.mass[sel]
        candidates = int((acts[:, u] != 0).sum()) if excluded[u] else acts.shape[0]
        assert float(mass.sum()) == pytest.approx(min(100, candidates))  # the slots filled: top_k, or fewer
        if excluded[u]:
            assert bool((acts[images, u] != 0).all())
    nonzero = (acts[:, 4] != 0).nonzero().flatten()
    best = nonzero[acts[nonzero, 4].argsort(descending=True)][:100]
    assert set(m.images_of(4).tolist()) == set(best.tolist())  # negative winners rank, zeros do not
    assert bool((acts[best, 4] < 0).any())
    assert set(m.images_of(1).tolist()) == set(range(7)) and float(m.scale[1]) == pytest.approx(100 / 7)
    assert m.images_of(2).numel() == 500 and float(m.mass[m.unit == 2][0]) == pytest.approx(100 / 500)
    assert set(m.images_of(3).tolist()) == set(range(130))
    assert torch.allclose(m.mass[m.unit == 3], torch.full((130,), 100 / 130, dtype=torch.float64))
    # the tie at the top shares the mean weight of the 100 positions it fills
    assert float(m.weight[m.unit == 3][0]) == pytest.approx(0.998 - (99 / 2 / 100) * (0.998 - 0.97))


def test_top_images_leave_out_the_floor_and_keep_every_tie_at_the_cut():
    values = torch.zeros(50, 3)
    values[[4, 9, 31], 0] = torch.tensor([0.5, 0.9, 0.2])
    values[:, 1] = torch.arange(50.0)
    values[[1, 7, 20, 44], 2] = torch.tensor([3.0, 2.0, 2.0, 2.0])
    shown = top_images(values, 2)
    assert shown[0] == [9, 4]
    assert shown[1] == [49, 48]
    assert shown[2] == [1, 7, 20, 44]  # three images tied at the second place: all shown, by id
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    again = top_images(values[perm], 2, ids=perm)
    assert again == shown
    assert top_images(torch.zeros(30, 2), 5) == [[], []]  # a unit that never fires shows nothing


def _record(pooled, ids):
    active = (pooled != 0).float().mean(0)
    k = pooled.shape[1]
    return LayerRecord("layer", pooled, pooled[:1], ids[:1, None].expand(1, k), active, active, False, image_ids=ids)


def test_label_layer_is_independent_of_the_recording_order():
    # the same probe recorded in another order (a sharded or shuffled loader): rows come with their image ids
    acts, sims = lwta_like(5, n=400, k=16, m=20, rate=0.06)
    concepts = [f"c{j}" for j in range(sims.shape[1])]
    base = label_layer(_record(acts, torch.arange(400)), sims, concepts)
    for s in range(3):
        order = torch.randperm(400, generator=torch.Generator().manual_seed(s))
        other = label_layer(_record(acts[order], order), sims, concepts)
        assert other.labels == base.labels
        assert [r.top_images for r in other.rows] == [r.top_images for r in base.rows]
        for a, b in zip(other.rows, base.rows):
            assert (a.score is None and b.score is None) or abs(a.score - b.score) < 1e-9


def test_label_layer_is_independent_of_the_order_of_the_probe_images():
    # another probe holding the same images in another order (image i becomes perm^-1(i)): with nothing held out
    # (the split hashes the index, so it would hold out other images), the labels and scores are the same and the
    # top images are the same images
    acts, sims = lwta_like(6, n=400, k=16, m=20, rate=0.06)
    concepts = [f"c{j}" for j in range(sims.shape[1])]
    base = label_layer(_record(acts, torch.arange(400)), sims, concepts, holdout=0.0)
    for s in range(3):
        perm = torch.randperm(400, generator=torch.Generator().manual_seed(10 + s))
        other = label_layer(_record(acts[perm], torch.arange(400)), sims[perm], concepts, holdout=0.0)
        assert other.labels == base.labels
        for a, b in zip(other.rows, base.rows):
            assert (a.score is None and b.score is None) or abs(a.score - b.score) < 1e-9
            assert sorted(perm[a.top_images].tolist()) == sorted(b.top_images)
