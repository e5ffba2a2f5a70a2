"""Network Dissection: exact streaming thresholds, hand-computed IoU, oracle units on the generated data."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lwta_vision.data.generated import ShapesConceptDataset
from lwta_vision.dissect.engine import LayerLabels, NeuronRow
from lwta_vision.dissect.iou import (GeneratedMasks, TopQuantile, iou_dissect, label_agreement, mask_source_for,
                                     streaming_thresholds, top_rank)
from lwta_vision.dissect.probe import ProbeSet
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
    assert iou.shape == (4, len(ds.concept_names)) and iou.min() >= 0 and iou.max() <= 1
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
    assert math.isnan(label_agreement(text, _labels([None] * 5, [0.0] * 5))["agreement"])
    with pytest.raises(ValueError, match="same layer"):
        label_agreement(_labels(["a"]), iou)
