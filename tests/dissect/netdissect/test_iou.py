"""Network Dissection: exact streaming thresholds, hand-computed IoU, oracle units on the generated data."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lwta_vision.data.generated import ShapesConceptDataset
from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.labels import LayerLabels, NeuronRow
from lwta_vision.dissect.netdissect.iou import (
    GeneratedMasks,
    TopQuantile,
    iou_dissect,
    iou_matrix,
    label_agreement,
    mask_source_for,
    streaming_thresholds,
    top_rank,
)
from lwta_vision.dissect.report import write_tables


class MapsProbe(ProbeSet):
    """A probe set whose 'network input' for image i is a given activation map, for an identity model."""

    def __init__(self, maps: torch.Tensor, name: str = "maps"):
        super().__init__(list(range(len(maps))), transform=None, name=name)
        self.maps = maps

    def network_dataset(self):
        return TensorDataset(self.maps, torch.arange(len(self.maps)))


class ListMasks:
    concept_categories = ["a", "b"]
    concept_names = ["A", "B"]

    def __init__(self, masks):
        self._masks = masks

    def __len__(self):
        return len(self._masks)

    def masks(self, i):
        return self._masks[i]


def identity():
    return nn.Sequential(nn.Identity())  # layer "0" outputs the input maps


def test_top_rank_and_streaming_thresholds_match_the_order_statistic_and_torch_quantile():
    assert top_rank(0.005, 200) == 1 and top_rank(0.005, 201) == 2 and top_rank(0.5, 1) == 1
    acts = torch.randn(11, 3, 5, 7)
    acts[:, 2] = acts[:, 2].round()  # many ties in unit 2
    loader = DataLoader(TensorDataset(acts, torch.arange(11)), batch_size=4)  # uneven last batch
    flat = acts.transpose(0, 1).reshape(3, -1)
    n = flat.shape[1]
    for q in (0.005, 0.05, 0.3):
        t = streaming_thresholds(identity(), "0", loader, quantile=q)
        r = top_rank(q, n)
        desc = flat.sort(dim=1, descending=True).values
        assert torch.equal(t, desc[:, r - 1])  # exactly the r-th largest
        ref = torch.quantile(flat, 1 - q, dim=1)  # interpolates: within one order statistic either side
        assert torch.all(ref >= desc[:, min(r, n - 1)]) and torch.all(ref <= desc[:, max(r - 2, 0)])
        assert ((flat > t[:, None]).sum(1) <= r - 1).all()


def test_top_quantile_capacity_and_loader_size_errors():
    tq = TopQuantile(0.1, capacity=20)
    tq.update(torch.arange(10.0)[None])  # fewer values than planned is fine (rank on what was seen)
    assert tq.threshold().item() == 9.0
    with pytest.raises(ValueError, match="num_positions_total"):
        tq.update(torch.zeros(1, 11))
    batches = [(torch.randn(2, 3, 4, 4), torch.arange(2))]
    with pytest.raises(ValueError, match="num_positions_total"):
        streaming_thresholds(identity(), "0", batches)
    t = streaming_thresholds(identity(), "0", batches, quantile=0.25, num_positions_total=32)
    assert torch.equal(t, batches[0][0].transpose(0, 1).reshape(3, -1).sort(1, descending=True).values[:, 7])


def test_iou_by_hand_same_resolution():
    # unit 0, image 0: values 0..15 row-major; image 1: all 0. 32 positions, q=0.25 -> r=8 -> T = 8,
    # so M_0 = {9..15} in image 0 (7 pixels). Unit 1: constant -> nothing above T -> no label.
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 0] = torch.arange(16.0).reshape(4, 4)
    maps[:, 1] = 3.0
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0].view(-1)[10:16] = True  # values 10..15: 6 pixels, all inside M_0
    a[1, 0, :3] = True  # 3 pixels where M_0 is empty
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    b[0].view(-1)[7:11] = True  # values 7..10: inter {9, 10} = 2
    masks = ListMasks([torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]])])
    labels, iou = iou_dissect(identity(), "0", MapsProbe(maps), masks, quantile=0.25, iou_threshold=0.3)
    # A: inter 6, union 7 + 9 - 6 = 10; B: inter 2, union 7 + 4 - 2 = 9
    assert torch.allclose(iou, torch.tensor([[0.6, 2 / 9], [0.0, 0.0]]), atol=0, rtol=1e-6)
    r0, r1 = labels.rows
    assert (r0.label, r0.next_labels) == ("A", ["B"]) and r0.score == pytest.approx(0.6)
    assert r1.label is None and r1.score == 0.0 and r1.active
    s = labels.summary
    assert (s["detectors"], s["unique_concepts"], s["per_category"]) == (1, 1, {"a": 1, "b": 0})
    assert s["mean_iou"] == pytest.approx(0.6) and s["quantile"] == 0.25 and s["iou_threshold"] == 0.3
    assert r0.top_images[0] == 0


def test_iou_by_hand_with_bilinear_upsampling():
    # a 1x2 map [0, 8] upsampled to 1x4 (align_corners=False) reads [0, 2, 6, 8]; 2 images x 2 positions,
    # q=0.5 -> r=2 -> T = 0 (2nd largest of {0, 8, 0, 0}) -> binarised [0, 1, 1, 1] in image 0 only.
    maps = torch.zeros(2, 1, 1, 2)
    maps[0, 0, 0, 1] = 8.0
    m0 = torch.tensor([[[False, False, True, True]], [[True, False, False, False]]])  # A: right half, B: left px
    m1 = torch.tensor([[[True, True, True, True]], [[False, False, False, False]]])
    labels, iou = iou_dissect(identity(), "0", MapsProbe(maps), ListMasks([m0, m1]), quantile=0.5)
    # A: inter 2 (img 0), union 3 + (2 + 4) - 2 = 7; B: inter 0, union 3 + 1 = 4
    assert torch.allclose(iou, torch.tensor([[2 / 7, 0.0]]))
    assert labels.rows[0].label == "A" and labels.rows[0].next_labels == []


class FirstN(torch.utils.data.Dataset):
    """Like the training callback's wrapper: forwards every other attribute to the wrapped dataset."""

    def __init__(self, ds, n):
        self.dataset, self.n = ds, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]

    def __getattr__(self, name):
        if name in ("dataset", "n"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


@pytest.fixture(scope="module")
def shapes():
    ds = ShapesConceptDataset(num_samples=30, image_size=32, seed=3, split="val")
    source = GeneratedMasks(FirstN(ds, 24))
    masks = torch.stack([source.masks(i) for i in range(len(source))]).float()
    return ds, source, masks


def test_oracle_units_on_generated_data_recover_their_concepts(shapes):
    _ds, source, masks = shapes
    assert len(source) == 24 and source.concept_names == ShapesConceptDataset.concept_names
    present = masks.flatten(2).any(2).any(0)
    # oracle: unit k's map is concept k's mask. With q=0.5 every concept covers fewer positions than r, so
    # T_k = 0 and the binarised map is exactly the mask: IoU 1 with itself.
    labels, iou = iou_dissect(identity(), "0", MapsProbe(masks), source, quantile=0.5, batch_size=10)
    assert torch.equal(iou.diagonal()[present], torch.ones(int(present.sum())))
    assert iou.diagonal()[~present].eq(0).all() and present.sum() >= 15
    for k, row in enumerate(labels.rows):
        assert row.label == (source.concept_names[k] if present[k] else None)
    assert labels.summary["detectors"] == labels.summary["unique_concepts"] == int(present.sum())
    assert sum(labels.summary["per_category"].values()) == int(present.sum())
    assert set(labels.summary["per_category"]) == {"shape", "colour", "texture"}


def test_noisy_oracle_at_default_quantile_matches_the_rank_formula(shapes):
    _ds, source, masks = shapes
    noisy = masks * (1 + torch.rand(masks.shape))  # distinct values inside each mask, 0 outside
    n = masks.shape[0] * masks.shape[2] * masks.shape[3]
    r = top_rank(0.005, n)
    _labels, iou = iou_dissect(identity(), "0", MapsProbe(noisy), source, batch_size=16)
    area = masks.sum((0, 2, 3))
    for k in range(len(area)):
        if area[k] >= r:  # r-1 pixels above T, all inside the mask
            assert iou[k, k].item() == pytest.approx((r - 1) / area[k].item(), rel=1e-6)
        elif area[k] > 0:  # fewer mask pixels than r: T is an outside 0, the whole mask is above it
            assert iou[k, k].item() == pytest.approx(1.0)


def test_mask_source_for_and_errors(shapes):
    ds, _source, _masks = shapes
    assert isinstance(mask_source_for(ds), GeneratedMasks)
    with pytest.raises(TypeError, match="no concept masks"):
        mask_source_for([1, 2, 3])
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    with pytest.raises(ValueError, match="IoU needs spatial maps; layer '1' outputs shape"):
        iou_dissect(linear, "1", MapsProbe(torch.zeros(2, 3, 4, 4)), ListMasks([torch.zeros(2, 4, 4)] * 2))
    with pytest.raises(ValueError, match="same images"):
        iou_dissect(identity(), "0", MapsProbe(torch.zeros(3, 2, 4, 4)), ListMasks([torch.zeros(2, 4, 4)] * 2))


def test_real_probe_set_and_report_tables(shapes, tmp_path):
    ds, _source, _masks = shapes
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 4, 3, padding=1))
    from torchvision import transforms as T

    probe = ProbeSet(FirstN(ds, 12), T.ToTensor(), "shapes")
    labels, iou = iou_dissect(net, "3", probe, quantile=0.01, batch_size=5)  # 16x16 maps -> 32x32 masks
    # the same IoUs as the definition, on the maps of the same network over the same batches
    loader = torch.utils.data.DataLoader(probe.network_dataset(), batch_size=5)
    with torch.no_grad():
        maps = torch.cat([net(x) for x, _ in loader])
    ref = _ungated_iou(maps, _exact_thresholds(maps, 0.01), _masks[:12])
    assert iou.shape == (4, len(ds.concept_names)) and torch.equal(iou, ref) and ref.max() > 0
    assert all(len(r.top_images) == 10 for r in labels.rows) and net.training
    write_tables(tmp_path, {"3": labels})
    summary = json.loads((tmp_path / "summary.json").read_text())["layers"]["3"]
    assert summary["method"] == "iou" and "per_category" in summary


def _labels(names, scores=None):
    rows = [NeuronRow("l", u, n, (scores or [1.0] * len(names))[u], [], [], 0.5, 0.5, True, [])
            for u, n in enumerate(names)]
    return LayerLabels("l", rows, {"iou_threshold": 0.04})


def test_label_agreement_counts_only_detectors():
    text = _labels(["red", "Circle", None, "dots", "ring"])
    iou = _labels(["red-c", "circle", "square", "stripes", None], [0.3, 0.1, 0.2, 0.05, 0.0])
    out = label_agreement(text, iou)
    assert (out["detectors"], out["text_labelled"], out["agree"]) == (4, 3, 2)
    assert out["agreement"] == 0.5 and out["agreement_labelled"] == pytest.approx(2 / 3)
    assert out["agreeing_units"] == [0, 1]
    assert label_agreement(text, iou, iou_threshold=0.15)["detectors"] == 2
    assert label_agreement(text, _labels([None] * 5, [0.0] * 5))["agreement"] is None  # no NaN in outputs
    with pytest.raises(ValueError, match="same layer"):
        label_agreement(_labels(["a"]), iou)



# ------------------------------------------------------------------ NetDissect-Lite's category-gated union
def _netdissect_reference(maps, thresholds, mask_list, categories, gated=True):
    """NetDissect-Lite's tally written out with loops over images, units and concepts: per image and unit,
    the unit's active pixels go to the union of a category's concepts only if they touch a pixel labelled
    with some concept of that category. ``gated=False``: every image's active pixels, sum |M_k | L_c|."""
    num_k, num_m = maps.shape[1], len(categories)
    cats = sorted(set(categories))
    inter = torch.zeros(num_k, num_m, dtype=torch.float64)
    units_cat = {(k, cat): 0.0 for k in range(num_k) for cat in cats}
    labels = torch.zeros(num_m, dtype=torch.float64)
    for img, lab in enumerate(mask_list):
        lab = torch.as_tensor(lab, dtype=torch.bool)
        labels += lab.flatten(1).sum(1).double()
        up = nn.functional.interpolate(maps[img:img + 1].float(), size=lab.shape[-2:], mode="bilinear",
                                       align_corners=False)[0]
        for k in range(num_k):
            active = up[k] > thresholds[k]
            for c in range(num_m):
                inter[k, c] += (active & lab[c]).sum().item()
            for cat in cats:
                touched = any((active & lab[c]).any().item() for c in range(num_m) if categories[c] == cat)
                units_cat[k, cat] += active.sum().item() * (touched or not gated)
    iou = torch.zeros(num_k, num_m, dtype=torch.float64)
    for k in range(num_k):
        for c in range(num_m):
            union = units_cat[k, categories[c]] + labels[c].item() - inter[k, c].item()
            iou[k, c] = inter[k, c] / union if union > 0 else 0.0
    return iou.float()


def _ungated_iou(maps, thresholds, masks):
    """Vectorised sum |M_k & L_c| / sum |M_k | L_c| for maps [N, K, h, w] and equal-size masks [N, M, H, W]."""
    up = nn.functional.interpolate(maps.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    binary = (up > thresholds[None, :, None, None]).double().flatten(2)  # [N, K, P]
    lab = masks.double().flatten(2)  # [N, M, P]
    inter = torch.einsum("nkp,nmp->km", binary, lab)
    union = binary.sum((0, 2))[:, None] + lab.sum((0, 2))[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter)).float()


def _exact_thresholds(maps, q):
    flat = maps.transpose(0, 1).reshape(maps.shape[1], -1)
    return flat.sort(1, descending=True).values[:, top_rank(q, flat.shape[1]) - 1]


def _labels_from(iou, names):
    best, j = iou.max(1)
    return [names[c] if s > 0 else None for s, c in zip(best.tolist(), j.tolist())]


class PartialMasks:
    """Three categories: 'object' pixel-level with unlabelled pixels, 'texture' image-level (full planes) on
    two images in three, 'part' pixel-level and missing from odd images altogether. Two mask sizes."""

    concept_names = ["o1", "o2", "t1", "t2", "p1"]
    concept_categories = ["object", "object", "texture", "texture", "part"]

    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self._masks = []
        for i in range(n):
            h, w = (8, 8) if i % 3 else (6, 10)
            m = torch.zeros(5, h, w, dtype=torch.bool)
            obj = torch.randint(0, 3, (h, w), generator=g)  # 0: unlabelled
            m[0], m[1] = obj == 1, obj == 2
            if i % 3:  # texture t1 or t2 on the whole image; none on every third image
                m[1 + i % 3] = True
            if i % 2 == 0:
                m[4] = torch.rand(h, w, generator=g) < 0.3
            self._masks.append(m)

    def __len__(self):
        return len(self._masks)

    def masks(self, i):
        return self._masks[i]


class PartialPresentMasks(PartialMasks):
    """The same data through present_masks (as Broden serves it)."""

    def present_masks(self, i):
        m = self._masks[i]
        idx = m.flatten(1).any(1).nonzero().flatten()
        return idx, m[idx]


@pytest.mark.parametrize("source_cls", [PartialMasks, PartialPresentMasks])
def test_iou_union_matches_netdissect_lite_tally_on_partially_annotated_categories(source_cls):
    torch.manual_seed(1)
    n, k = 9, 5
    maps = torch.randn(n, k, 4, 4)
    source = source_cls(n)
    mask_list = [source.masks(i) for i in range(n)]
    cats = source.concept_categories
    # the real path: iou_dissect (exact r-th largest thresholds; uneven batches mixing two mask sizes)
    q = 0.2
    labels, iou = iou_dissect(identity(), "0", MapsProbe(maps), source, quantile=q, batch_size=4)
    t = _exact_thresholds(maps, q)
    ref = _netdissect_reference(maps, t, mask_list, cats)
    assert torch.allclose(iou, ref, atol=1e-6, rtol=0)
    assert [r.label for r in labels.rows] == _labels_from(ref, source.concept_names)
    # the gate matters on this data: the ungated union gives other IoUs (and other labels)
    ungated = _netdissect_reference(maps, t, mask_list, cats, gated=False)
    assert (ungated - ref).abs().max() > 0.01
    # random thresholds through iou_matrix directly, given the category index of each concept
    flat = maps.transpose(0, 1).reshape(k, -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    t_rand = lo + torch.rand(k) * (hi - lo)
    batches = []
    for b0 in range(0, n, 4):
        ids = list(range(b0, min(n, b0 + 4)))
        present = [(m.flatten(1).any(1).nonzero().flatten(), m) for m in (mask_list[i] for i in ids)]
        present = [(idx, m[idx]) for idx, m in present]
        batches.append((maps[ids], torch.tensor(ids), [p[0] for p in present], [p[1] for p in present]))
    cat_ids = torch.tensor([sorted(set(cats)).index(c) for c in cats])
    got = iou_matrix(identity(), "0", batches, t_rand, 5, categories=cat_ids)
    assert torch.allclose(got, _netdissect_reference(maps, t_rand, mask_list, cats), atol=1e-6, rtol=0)
    assert torch.equal(iou_matrix(identity(), "0", batches, t_rand, 5, categories=cat_ids, fully_annotated=True),
                       iou_matrix(identity(), "0", batches, t_rand, 5))  # no gate: the ungated union
    assert torch.allclose(iou_matrix(identity(), "0", batches, t_rand, 5),
                          _netdissect_reference(maps, t_rand, mask_list, cats, gated=False), atol=1e-6, rtol=0)


def test_generated_shapes_data_keeps_the_ungated_union(shapes):
    _ds, source, masks = shapes
    assert source.fully_annotated
    torch.manual_seed(2)
    maps = torch.rand(masks.shape[0], 6, 16, 16)  # upsampled to the 32x32 masks
    q = 0.05
    labels, iou = iou_dissect(identity(), "0", MapsProbe(maps), source, quantile=q, batch_size=10)
    ref = _ungated_iou(maps, _exact_thresholds(maps, q), masks)
    assert torch.equal(iou, ref)
    assert [r.label for r in labels.rows] == _labels_from(ref, source.concept_names)

    class NotFullyAnnotated(GeneratedMasks):
        fully_annotated = False

    # the exception matters: background pixels carry no concept, so the gate would change the IoUs
    _labels2, gated = iou_dissect(identity(), "0", MapsProbe(maps), NotFullyAnnotated(source.dataset),
                                  quantile=q, batch_size=10)
    assert not torch.equal(gated, ref)


class EveryPixelLabelled:
    """No ``fully_annotated`` attribute, but every pixel carries one concept of each category: the gate
    always opens where the unit fires, so the union is the ungated one."""

    concept_names = ["a1", "a2", "a3", "b1", "b2"]
    concept_categories = ["a", "a", "a", "b", "b"]

    def __init__(self, n):
        g = torch.Generator().manual_seed(5)
        a = torch.randint(0, 3, (n, 8, 8), generator=g)
        b = torch.randint(0, 2, (n, 8, 8), generator=g)
        self.all = torch.stack([a == 0, a == 1, a == 2, b == 0, b == 1], 1)

    def __len__(self):
        return len(self.all)

    def masks(self, i):
        return self.all[i]


def test_source_labelled_everywhere_in_every_category_gives_the_ungated_union():
    torch.manual_seed(3)
    maps = torch.randn(7, 4, 4, 4)
    source = EveryPixelLabelled(7)
    assert not hasattr(source, "fully_annotated")
    q = 0.1
    labels, iou = iou_dissect(identity(), "0", MapsProbe(maps), source, quantile=q, batch_size=3)
    ref = _ungated_iou(maps, _exact_thresholds(maps, q), source.all)
    assert torch.equal(iou, ref)
    assert [r.label for r in labels.rows] == _labels_from(ref, source.concept_names)
