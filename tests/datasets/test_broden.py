"""Broden reader on a tiny Broden-format folder: names, mask decoding (R + 256 G), image-level labels, IoU."""
import pytest
import torch
from tiny_broden import LABELS, S, broden  # noqa: F401  (the folder fixture)
from torch import nn
from torch.utils.data import TensorDataset

from lwta_vision.datasets.broden import BrodenDataset
from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.netdissect.iou import iou_dissect, mask_source_for


def test_names_categories_and_decoded_masks(broden):
    ds = BrodenDataset(broden)
    assert ds.concept_names == ["red-c", "sky", "wood", "wheel", "street-s", "striped"]
    assert ds.concept_categories == ["color", "object", "material", "part", "scene", "texture"]
    assert len(ds) == 4 and ds[0][1] == -1 and ds[0][0].size == (16, 16) and ds.mask_size(0) == (S, S)
    m = ds.masks(0)
    assert m.shape == (6, S, S) and m.dtype == torch.bool
    assert m[0, :2].all() and m[0].sum() == 2 * S  # red
    assert m[1, 4:, :4].all() and m[1].sum() == 16 and m[2, 4:, 4:].all() and m[2].sum() == 16
    assert m[3, 0, 0] and m[3].sum() == 1  # label 300 via the G channel
    assert m[4].all() and not m[5].any()  # scene is image-level: the whole mask
    m1 = ds.masks(1)
    assert m1[5].all() and m1[2].sum() == 2 * S and m1[1].sum() == 2 * S  # wood from the material PNG
    assert ds.masks(2)[3].sum() == 7  # 4 + 4 - 1 overlapping pixel
    idx, present = ds.present_masks(0)
    assert idx.tolist() == [0, 1, 2, 3, 4] and torch.equal(present, m[idx])
    assert ds.presence_matrix().tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0],
                                             [1, 0, 0, 0, 0, 0]]
    assert mask_source_for(ds) is ds


def test_category_split_and_size_filters(broden):
    obj = BrodenDataset(broden, categories=["object"])
    assert obj.concept_names == ["sky", "wood"] and obj.concept_categories == ["object", "object"]
    assert len(obj) == 2 and obj.masks(1)[1].sum() == 0  # material PNG not read for "object" only
    val = BrodenDataset(broden, split="val")
    assert [im.path for im in val.images] == ["src/2.jpg", "src/3.jpg"]
    assert len(BrodenDataset(broden, max_images=3)) == 3
    with pytest.raises(ValueError, match="unknown Broden category 'objects'.*object"):
        BrodenDataset(broden, categories=["objects"])
    with pytest.raises(ValueError, match="splits train, val"):
        BrodenDataset(broden, split="test")


def test_clear_errors(broden, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BrodenDataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="index.csv not found; found one in .*broden1_16, pass that"):
        BrodenDataset(tmp_path)
    (broden / "label.csv").rename(broden / "labels.csv")
    with pytest.raises(FileNotFoundError, match=r"label.csv not found.*number,name,category"):
        BrodenDataset(broden)
    (broden / "labels.csv").rename(broden / "label.csv")
    text = (broden / "index.csv").read_text()
    (broden / "index.csv").write_text(text.replace(f"src/3.jpg,val,16,16,{S},{S}", "src/3.jpg,val,16,16,x,8"))
    with pytest.raises(ValueError, match="line 5: column 'sh' must be an integer"):
        BrodenDataset(broden)
    (broden / "index.csv").write_text(text + "src/4.jpg,val,16\n")
    with pytest.raises(ValueError, match="line 6: expected 12 cells"):
        BrodenDataset(broden)
    (broden / "index.csv").write_text(text)
    (broden / "label.csv").write_text(LABELS + "7,bad,object(3\n")
    with pytest.raises(ValueError, match="line 9: category entry 'object\\(3'"):
        BrodenDataset(broden)


class MapsProbe(ProbeSet):
    def __init__(self, dataset, maps):
        super().__init__(dataset, transform=None, name="oracle")
        self.maps = maps

    def network_dataset(self):
        return TensorDataset(self.maps, torch.arange(len(self.maps)))


def test_iou_dissect_with_an_oracle_model(broden):
    ds = BrodenDataset(broden)
    maps = torch.stack([ds.masks(i) for i in range(len(ds))]).float()
    half = nn.functional.avg_pool2d(maps, 2)  # the oracle runs at half resolution, like a conv layer
    model = nn.Sequential(nn.Identity())
    labels, iou = iou_dissect(model, "0", MapsProbe(ds, maps), ds, quantile=0.5)
    assert torch.equal(iou.diagonal(), torch.ones(6))  # T = 0: binarised maps are the masks
    assert labels.labels == ds.concept_names and labels.summary["detectors"] == 6
    assert labels.summary["per_category"] == dict.fromkeys(["color", "object", "material", "part", "scene",
                                                            "texture"], 1)
    labels, iou = iou_dissect(model, "0", MapsProbe(ds, half), ds, quantile=0.5)  # upsampled 4x4 -> 8x8
    assert labels.labels == ds.concept_names and (iou.diagonal() > 0.2).all()  # wheel: 1-7 px, blurred most
