"""Dissection engine: recording, labeling, reports, and dissect.py end to end on tiny runs."""
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_broden import broden  # noqa: F401  (the tiny Broden-format folder fixture)
from tiny_run import trained_run  # noqa: F401  (a tiny quickstart checkpoint)
from torch import nn

from lwta_vision.checkpoints import load_network
from lwta_vision.cli import cli_main
from lwta_vision.dissect.clip_dissect.labeling import label_layer
from lwta_vision.dissect.evaluate import label_accuracy
from lwta_vision.dissect.labels import rank_concepts
from lwta_vision.dissect.recording import (
    LayerNotFoundError,
    expose_log_softmax,
    merge_records,
    pool_output,
    record_activations,
    resolve_layers,
)
from lwta_vision.dissect_cli import main as dissect_main
from lwta_vision.layers import LWTA

ROOT = Path(__file__).resolve().parents[2]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = LWTA(4, dim=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _loader(n=40, bs=7):
    x = torch.randn(n, 3, 8, 8)
    ds = torch.utils.data.TensorDataset(x, torch.arange(n))
    return torch.utils.data.DataLoader(ds, batch_size=bs), x


def test_record_running_topk_matches_full_matrix_and_hooks_removed():
    model = Tiny().train()
    loader, x = _loader()
    rec = record_activations(model, ["act", "fc"], loader, top_k=5)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert all(not m._forward_hooks for m in model.modules())
    with torch.no_grad():
        model.eval()
        full = model.act(model.conv(x)).mean((2, 3))
    assert torch.allclose(rec["act"].pooled, full, atol=1e-6)
    v, i = full.topk(5, dim=0)
    assert torch.allclose(rec["act"].top_values, v) and torch.equal(rec["act"].top_indices, i)
    # LWTA: each position has one winner per block of 4, so win rates of a block sum to 1
    assert torch.allclose(rec["act"].win_rate.reshape(2, 4).sum(1), torch.ones(2), atol=1e-6)
    assert rec["fc"].spatial is False and rec["act"].spatial is True


def test_sharded_recording_merges_to_the_single_process_result():
    model = Tiny()
    loader, x = _loader(30, 4)
    whole = record_activations(model, ["act"], loader, top_k=6)["act"]
    shards = []
    for r in range(2):
        idx = list(range(r, 30, 2))
        sub = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[idx], torch.tensor(idx)), batch_size=4)
        shards.append(record_activations(model, ["act"], sub, top_k=6)["act"])
    merged = merge_records(shards, 6)
    assert torch.allclose(merged.pooled, whole.pooled, atol=1e-6)
    assert torch.equal(merged.top_indices, whole.top_indices)
    # counts are summed, not rates averaged: bit-identical rates
    assert torch.equal(merged.win_rate, whole.win_rate) and torch.equal(merged.input_rate, whole.input_rate)
    assert merged.spatial and merged.positions == whole.positions


def test_unknown_layer_lists_close_names():
    with pytest.raises(LayerNotFoundError, match=r"'acts' not found.*closest: act"):
        resolve_layers(Tiny(), ["acts"])


def test_log_softmax_is_recorded_without_changing_the_model():
    model = Tiny().eval()
    loader, x = _loader(20, 6)
    with torch.no_grad():
        logits = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayerNotFoundError, match="dissect.py only"):
        resolve_layers(model, ["log_softmax"])
    assert expose_log_softmax(expose_log_softmax(model)) is model  # a second call adds nothing
    assert len(model._forward_hooks) == 1 and model.state_dict().keys() == state.keys()
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # the output is still the logits
    rec = record_activations(model, ["fc", "log_softmax"], loader, top_k=3)
    assert torch.allclose(rec["fc"].pooled, logits, atol=1e-6)
    assert torch.allclose(rec["log_softmax"].pooled, logits.log_softmax(1), atol=1e-6)
    conv = nn.Sequential(nn.Conv2d(3, 2, 1))
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        expose_log_softmax(conv)(x)


def test_pooling_modes():
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(pool_output(x, "max"), torch.tensor([[11.0, 23.0]]))
    t = torch.arange(12.0).reshape(1, 3, 4)
    assert torch.equal(pool_output(t, token_pooling="cls"), t[:, 0])
    assert torch.equal(pool_output(t, token_pooling="mean"), t.mean(1))
    with pytest.raises(ValueError, match="pooling"):
        pool_output(x, "median")


def test_label_layer_finds_the_planted_concept_and_skips_inactive_units():
    torch.manual_seed(0)
    n, k, m = 300, 4, 6
    acts = torch.rand(n, k)
    acts[:, 3] = 0  # a unit that never wins
    presence = (torch.rand(n, m) < 0.3).float()
    for unit, concept in ((0, 2), (1, 5), (2, 0)):
        top = acts[:, unit].topk(40).indices
        presence[:, concept] = 0
        presence[top, concept] = 1
    from lwta_vision.dissect.recording import LayerRecord

    rec = LayerRecord("l", acts, *acts.topk(50, dim=0), win_rate=(acts != 0).float().mean(0),
                      input_rate=(acts != 0).float().mean(0), spatial=False)
    names = [f"c{j}" for j in range(m)]
    res = label_layer(rec, presence, names, similarity_kwargs={"top_k": 40})
    assert res.labels == ["c2", "c5", "c0", None]
    assert res.rows[3].active is False
    assert res.summary["active_units"] == 3


def _record(acts):
    from lwta_vision.dissect.recording import LayerRecord

    return LayerRecord("l", acts, *acts.topk(min(50, acts.shape[0]), dim=0), win_rate=(acts != 0).float().mean(0),
                       input_rate=(acts != 0).float().mean(0), spatial=False)


def test_rank_concepts_decides_ties_by_the_second_key_then_by_order():
    scores = torch.tensor([[1.0, 1.0 + 1e-9, 0.5, 0.2],    # tie 0/1 (rounding-level): key decides
                           [0.3, 0.9, 0.9, 0.1],           # exact tie 1/2, equal keys: concept order
                           [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)  # no tie
    key = torch.tensor([[-5.0, -9.0, 0.0, 0.0],
                        [0.0, -1.0, -1.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0]])
    idx, how = rank_concepts(scores, key, n=3, tol=1e-3)
    assert idx.tolist() == [[0, 1, 2], [1, 2, 0], [3, 2, 1]]
    assert how[:, 0].tolist() == [1, 2, 0]
    # without the tolerance the rounding-level difference would decide, and the key would never be read
    assert rank_concepts(scores, key, n=1, tol=0.0)[0][:, 0].tolist() == [1, 1, 3]
    with pytest.raises(ValueError, match="tolerance"):
        rank_concepts(scores, key, tol=-1)


def test_rank_concepts_in_row_chunks_equals_all_at_once(monkeypatch):
    from lwta_vision.dissect import labels as engine

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (600, 40), generator=g).double()  # many exact ties
    key = torch.randint(0, 3, (600, 40), generator=g).double()  # and ties of the key
    chunked = rank_concepts(scores, key, 5)
    monkeypatch.setattr(engine, "_ROWS", 10_000)
    whole = rank_concepts(scores, key, 5)
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
    assert set(chunked[1].unique().tolist()) == {0, 1, 2}  # every way of deciding occurs


def test_tie_tolerance_applies_only_where_a_second_key_exists():
    """Cosine scores bunch within 1e-3 of each other; they must rank by their exact value, not by order."""
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(200, 8, generator=g)
    sim = 0.25 + 1e-4 * torch.rand(200, 50, generator=g)  # CLIP-like: every concept about equally similar
    res = label_layer(_record(acts), sim, [f"c{j}" for j in range(50)], similarity="cos_similarity")
    assert [r.label for r in res.rows] == [f"c{j}" for j in res.scores.argmax(1).tolist()]
    assert res.summary["tie_tol"] == 0.0  # only exact (float32) equalities are ties, left to concept order
    assert {r.decided_by for r in res.rows} <= {"score", "order"}
    with pytest.raises(ValueError, match="tie_tol"):
        label_layer(_record(acts), sim, [f"c{j}" for j in range(50)], tie_tol=float("nan"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saturated_ground_truth_labels_are_decided_by_contrast_not_rounding(seed):
    """Unit 0's top images all show concept 0 and about half show concept 1; no other unit's top images show
    either. Both concepts then score log K for unit 0 (soft-WPMI saturates) and the label is concept 0 because
    it sets the unit's top images apart more (all of them show it), whatever the last bits of the two scores
    are."""
    g = torch.Generator().manual_seed(seed)
    n, k = 400, 3
    acts = torch.rand(n, k, generator=g)
    presence = torch.zeros(n, 4)
    top = acts[:, 0].topk(40).indices
    presence[top, 0] = 1
    presence[top[torch.rand(40, generator=g) < 0.5], 1] = 1
    presence[:, 2] = (torch.rand(n, generator=g) < 0.5).float()
    presence[:, 3] = (torch.rand(n, generator=g) < 0.5).float()
    # every image chooses (holdout 0): the construction is about unit 0's top 40 of all 400
    res = label_layer(_record(acts), presence * 0.3, ["a", "b", "c", "d"], similarity_kwargs={"top_k": 40},
                      holdout=0.0)
    row = res.rows[0]
    assert row.label == "a"
    assert row.next_labels[0] == "b"
    assert abs(row.score - row.next_scores[0]) < 1e-4  # saturated: a tie in the primary score ...
    assert row.decided_by == "contrast" and abs(row.margin) < 1e-3  # ... decided by the contrast key
    assert res.summary["ties"] >= 1
    assert res.top_labels(2, ["a", "b", "c", "d"])[0] == ["a", "b"]


# --------------------------------------------------------------------------------------- dissect.py
def test_describe_writes_tables_and_html(trained_run, tmp_path):
    out = tmp_path / "out"
    dissect_main(["describe", "--checkpoint", str(trained_run), "--layers", "[layer2, layer3, fc]",
                  "--max_images", "64", "--output_dir", str(out), "--device", "cpu"])
    rows = list(csv.DictReader(open(out / "layer3.csv")))
    assert len(rows) == 128 and set(rows[0]) >= {"label", "score", "label_2", "label_3", "margin", "decided_by",
                                                  "win_rate", "top_images"}
    labelled = [r for r in rows if r["label"]]
    assert labelled and all(r["decided_by"] in ("score", "contrast", "order") for r in labelled)
    assert all(float(r["margin"]) >= -1e-3 for r in labelled)  # a tie's winner trails by less than tie_tol
    corr = [float(r["label_corr"]) for r in labelled if r["label_corr"]]
    auprc = [float(r["label_auprc"]) for r in labelled if r["label_auprc"]]
    assert corr and auprc and all(-1 <= c <= 1 for c in corr) and all(0 <= a <= 1 for a in auprc)
    assert not any(r["label_corr"] for r in rows if not r["label"])  # no label, no quality
    data = json.loads((out / "fc.json").read_text())
    assert len(data["units"]) == 6 and data["summary"]["units"] == 6
    html = (out / "index.html").read_text()
    assert "layer3" in html and "images/layer3/" in html and "label quality: corr" in html
    assert (out / "images" / "layer3").is_dir()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["scorer"] == "ConceptCLIPScorer"  # auto on the generated data: CLIP-Dissect proper
    assert summary["layers"]["layer3"]["ties"] == sum(r["decided_by"] != "score" for r in labelled)
    assert summary["layers"]["layer3"]["mean_label_corr"] == pytest.approx(sum(corr) / len(corr), abs=1e-6)
    assert not list(out.glob("**/*.tmp"))


def test_describe_with_tiny_clip_checkpoint(trained_run, tmp_path):
    import open_clip
    from tiny_clip import register_tiny_clip

    name = register_tiny_clip()
    clip = open_clip.create_model(name, pretrained=None)
    weights = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), weights)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nblue\ncircle\nsquare\nstripes\n")
    out = tmp_path / "clip"
    dissect_main(["describe", "--checkpoint", str(trained_run), "--layers", "[fc]", "--max_images", "32",
                  "--scorer", "clip", "--clip_model", name, "--clip_pretrained", "null", "--clip_checkpoint",
                  str(weights), "--concepts", str(concepts), "--cache_dir", str(tmp_path / "cache"),
                  "--output_dir", str(out), "--device", "cpu", "--html", "false"])
    labels = [r["label"] or None for r in csv.DictReader(open(out / "fc.csv"))]
    assert list((tmp_path / "cache").iterdir())  # embeddings cached
    # the same labels as the library gives with that CLIP on those images and words
    from lwta_vision.dissect.clip_dissect import CLIPScorer
    from lwta_vision.dissect.pipeline import record_probe
    from lwta_vision.dissect_cli.loading import load_inputs

    net, probe, _ = load_inputs(str(trained_run), None, "DEFAULT", None, "val", 32)
    words = ["red", "blue", "circle", "square", "stripes"]
    scorer = CLIPScorer(model_name=name, pretrained=None, checkpoint=str(weights), use_cache=False)
    expected = label_layer(record_probe(net, ["fc"], probe)["fc"], scorer.similarity(probe, words), words).labels
    assert labels == expected and any(expected)


def test_concept_clip_through_the_generic_clip_flags(trained_run, tmp_path):
    """`--scorer clip --clip_model lwta-concept-clip --clip_checkpoint FILE` is the shipped scorer, as a user
    passes any open_clip weights file; the default (auto) on the generated data is the same scorer."""
    from lwta_vision import concept_clip

    common = ["evaluate", "--checkpoint", str(trained_run), "--max_images", "96", "--device", "cpu",
              "--sentence_model", "null", "--cache_dir", str(tmp_path)]
    generic = dissect_main(common + ["--scorer", "clip", "--clip_model", concept_clip.MODEL_NAME,
                                     "--clip_pretrained", "null", "--clip_checkpoint",
                                     str(concept_clip.weights_path()), "--concepts", "generated"])
    default = dissect_main(common)
    assert generic["scorer"] == "CLIPScorer" and default["scorer"] == "ConceptCLIPScorer"
    assert generic["labels"] == default["labels"] and generic["margins"] == pytest.approx(default["margins"])


def test_evaluate_and_explain(trained_run, tmp_path, capsys):
    metrics = dissect_main(["evaluate", "--checkpoint", str(trained_run), "--max_images", "96", "--device", "cpu",
                            "--output", str(tmp_path / "m.json")])
    assert set(metrics) >= {"top1", "top5", "cos"}
    # the accuracy is that of the labels it reports (label_accuracy itself: tests/dissect/evaluate)
    class_names = load_network(trained_run)[1]["class_names"]
    assert metrics["top1"] == pytest.approx(label_accuracy(metrics["labels"], class_names)["top1"])
    assert json.loads((tmp_path / "m.json").read_text())["layer"] == "fc"
    assert len(metrics["label_corr"]) == metrics["num_units"] and "mean_label_auprc" in metrics
    logp = dissect_main(["evaluate", "--checkpoint", str(trained_run), "--max_images", "96", "--device", "cpu",
                         "--layer", "log_softmax", "--sentence_model", "null"])
    assert logp["layer"] == "log_softmax" and logp["num_units"] == metrics["num_units"]
    out = tmp_path / "labels"
    dissect_main(["describe", "--checkpoint", str(trained_run), "--layers", "[layer3, fc, log_softmax]",
                  "--max_images", "64", "--output_dir", str(out), "--device", "cpu", "--html", "false"])
    img = tmp_path / "x.png"
    from lwta_vision.data import ShapesConceptDataset

    Image.fromarray(ShapesConceptDataset(4, 32, seed=3).image(0)).save(img)
    res = dissect_main(["explain", str(img), "--checkpoint", str(trained_run), "--labels_dir", str(out),
                        "--device", "cpu"])
    assert res["prediction"] in ["circle", "square", "triangle", "star", "cross", "ring"]
    assert res["layers"]["layer3"] and res["contributions"][0]["layer"] == "layer3"
    assert [r["unit"] for r in res["layers"]["log_softmax"]] == [r["unit"] for r in res["layers"]["fc"]]
    assert "why" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["unknown_layer", "empty_concepts", "empty_folder", "other_arch", "not_ckpt"])
def test_dissect_bad_inputs_give_one_clear_error(case, trained_run, tmp_path, capsys):
    args = ["describe", "--checkpoint", str(trained_run), "--layers", "[layer3]", "--output_dir",
            str(tmp_path / "o"), "--device", "cpu", "--max_images", "16"]
    expect = {
        "unknown_layer": "layer 'layer9' not found",
        "empty_concepts": "empty",
        "empty_folder": "contains no images",
        "other_arch": "does not match architecture",
        "not_ckpt": "not a readable PyTorch checkpoint",
    }[case]
    if case == "unknown_layer":
        args[4] = "[layer9]"
    elif case == "empty_concepts":
        (tmp_path / "c.txt").write_text("\n\n")
        args += ["--concepts", str(tmp_path / "c.txt")]
    elif case == "empty_folder":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "notes.txt").write_text("x")
        args += ["--image_folder", str(tmp_path / "imgs")]
    elif case == "other_arch":
        ckpt = torch.load(trained_run, weights_only=False)
        ckpt["hyper_parameters"]["model_kwargs"]["widths"] = [16, 32, 64]
        torch.save(ckpt, tmp_path / "other.ckpt")
        args[2] = str(tmp_path / "other.ckpt")
    elif case == "not_ckpt":
        (tmp_path / "bad.ckpt").write_bytes(b"definitely not a checkpoint")
        args[2] = str(tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit) as exc:
        dissect_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # no partial output


def test_iou_subcommand_writes_side_by_side_report(trained_run, tmp_path, capsys):
    out = tmp_path / "iou"
    summaries = dissect_main(["iou", "--checkpoint", str(trained_run), "--layers", "[layer2, layer3]",
                              "--max_images", "48", "--quantile", "0.05", "--output_dir", str(out), "--device", "cpu"])
    s = summaries["layer3"]
    rows = list(csv.DictReader(open(out / "layer3.csv")))
    assert s["units"] == len(rows) == 128
    detectors = [r for r in rows if r["label"] and float(r["score"]) > s["iou_threshold"]]
    assert s["detectors"] == len(detectors)
    assert set(s["per_category"]) == {"shape", "colour", "texture"}
    assert sum(s["per_category"].values()) == len(detectors)
    # the text side is CLIP-Dissect with ground truth on the same images: describe's labels of the same units
    text_out = tmp_path / "text"
    dissect_main(["describe", "--checkpoint", str(trained_run), "--layers", "[layer3]", "--max_images", "48",
                  "--scorer", "ground_truth", "--output_dir", str(text_out), "--device", "cpu", "--html", "false"])
    text = {int(r["unit"]): r["label"] for r in csv.DictReader(open(text_out / "layer3.csv"))}
    agree = sum(text[int(r["unit"])] == r["label"] for r in detectors)
    assert s["text_agreement"] == (pytest.approx(agree / len(detectors)) if detectors else None)
    assert "text label:" in (out / "index.html").read_text()
    assert "detectors" in capsys.readouterr().out


def test_callback_iou_layers_logs_detectors(tmp_path):
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.init_args.num_train", "128",
            "--data.init_args.num_val", "64", "--data.init_args.batch_size", "32", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks.init_args.iou_layers", "[layer3]",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    cli_main(args)
    rows = list(csv.DictReader(open(next(tmp_path.glob("**/metrics.csv")))))
    assert any(r.get("dissect/layer3/detectors") for r in rows)
    assert any(r.get("dissect/layer3/unique_concepts") for r in rows)


def test_dissection_callback_does_not_change_training(tmp_path):
    """Two epochs with and without the dissection callback (concept CLIP, built and cached during the run)
    end with the same weights: the callback's model building and DataLoaders draw from a forked RNG."""
    def run(out, *extra):
        cli = cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.init_args.num_train",
                        "128", "--data.init_args.num_val", "64", "--data.init_args.batch_size", "32",
                        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2",
                        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out),
                        "--trainer.default_root_dir", str(out), *extra])
        return cli.model.state_dict()

    with_cb = run(tmp_path / "a")
    without = run(tmp_path / "b", "--trainer.callbacks", "[]")
    assert with_cb.keys() == without.keys()
    assert all(torch.equal(with_cb[k], without[k]) for k in with_cb)




def test_iou_subcommand_on_a_broden_folder(trained_run, broden, tmp_path):  # noqa: F811
    out = tmp_path / "b"
    summaries = dissect_main(["iou", "--checkpoint", str(trained_run), "--layers", "[layer3]", "--broden",
                              str(broden), "--quantile", "0.1", "--output_dir", str(out), "--device", "cpu"])
    assert summaries["layer3"]["units"] == 128 and summaries["layer3"]["images"] == 4
    meta = json.loads((out / "summary.json").read_text())["meta"]
    assert meta["probe"].startswith("broden:")
