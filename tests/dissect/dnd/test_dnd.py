"""Describe-and-Dissect: attention cropping on hand-built maps, the pure selection math, the generative
wrappers on tiny local models and a fake OpenAI-compatible server, and dissect.py dnd end to end."""
import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_hf import build_tiny_captioner, build_tiny_causal_lm, build_tiny_diffusion
from tiny_run import trained_run  # noqa: F401  (a tiny quickstart checkpoint)

from lwta_vision.data.generated import ShapesConceptDataset
from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer, WeightsUnavailableError
from lwta_vision.dissect.dnd.generative import (
    DiffusersGenerator,
    GroundTruthCaptioner,
    HFCaptioner,
    HFSummarizer,
    OpenAISummarizer,
)
from lwta_vision.dissect.dnd.selection import (
    Exemplar,
    ProbeRetriever,
    attention_boxes,
    candidate_concepts,
    clean_concept,
    connected_components,
    otsu_threshold,
    rank_scores,
    select_concepts,
)
from lwta_vision.dissect_cli import main as dissect_main


# ------------------------------------------------------------------------------------ stage 1: cropping
def test_otsu_splits_two_modes():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(500, generator=g) * 0.1, 3 + torch.randn(100, generator=g) * 0.1])
    t = otsu_threshold(v)
    assert (v[:500] <= t).all() and (v[500:] > t).all()  # any cut in the gap is optimal
    assert otsu_threshold(torch.ones(10)) == 1.0  # constant: nothing above


def test_connected_components_8_connectivity():
    m = torch.zeros(6, 6, dtype=torch.bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one region
    m[4:6, 4:6] = True
    m[0, 5] = True
    lab = connected_components(m)
    assert lab[0, 0] == lab[1, 1] != 0
    assert len({int(lab[0, 0]), int(lab[4, 4]), int(lab[0, 5])}) == 3
    assert int(lab.max()) == 3 and (lab[~m] == 0).all()
    assert (connected_components(torch.ones(3, 3, dtype=torch.bool)) == 1).all()


def _blob(amap, x0, y0, x1, y1, v):
    amap[y0:y1, x0:x1] = v


def test_attention_boxes_on_hand_built_maps():
    # map at image resolution: bilinear resizing to the same size is the identity, boxes are exact
    a = torch.zeros(32, 32)
    _blob(a, 2, 3, 10, 9, 1.0)     # strong blob
    _blob(a, 20, 18, 30, 30, 0.8)  # weaker, larger
    assert attention_boxes(a, (32, 32)) == [(20, 18, 30, 30), (2, 3, 10, 9)]  # strongest (sum) first

    # a region covering almost the whole image is no crop (IoU with the image >= 0.8)
    b = torch.zeros(32, 32)
    _blob(b, 0, 0, 32, 30, 1.0)
    assert attention_boxes(b, (32, 32)) == []

    # a region whose box overlaps a stronger kept box by IoU > 0.5 is dropped
    c = torch.zeros(32, 32)
    c[0:20, 0:20] = 1.0
    c[1:19, 1:19] = 0.0        # frame (weaker: 76 px): box (0,0,20,20)
    c[3:17, 3:17] = 0.9        # separate inner square (stronger): IoU 196/400 = 0.49 <= 0.5 -> both kept
    assert attention_boxes(c, (32, 32)) == [(3, 3, 17, 17), (0, 0, 20, 20)]
    c[2:18, 2:18] = 0.9        # larger inner square, still 1 px from the frame: IoU 256/400 = 0.64 -> frame dropped
    assert attention_boxes(c, (32, 32)) == [(2, 2, 18, 18)]

    # at most max_crops, strongest first; a low-resolution map is upsampled to the image size
    d = torch.zeros(8, 8)
    for k, (x, y) in enumerate([(0, 0), (3, 0), (6, 0), (0, 4), (3, 4), (6, 6)]):
        d[y:y + 2, x:x + 1] = 1.0 + k
    boxes = attention_boxes(d, (32, 32), max_crops=4)
    assert len(boxes) == 4
    assert boxes[0][0] >= 20 and boxes[0][1] >= 20  # the strongest blob (k=5) is at the bottom right


# ------------------------------------------------------------------------------------ stage 3: selection
def test_rank_scores_by_hand():
    real = torch.tensor([10.0, 9.0, 8.0])
    good, bad = torch.tensor([9.5, 7.0]), torch.tensor([1.0, 0.5])
    # all sorted: 10, 9.5(g), 9, 8, 7(g), 1(b), .5(b) -> good ranks 2, 5; bad 6, 7
    s = rank_scores(real, [good, bad], beta=5)
    assert torch.allclose(s, torch.tensor([(4 + 25) / 2, (36 + 49) / 2], dtype=torch.float64))
    assert rank_scores(real, [good], beta=1)[0] == 4  # only the best rank counts
    assert torch.isinf(rank_scores(real, [torch.empty(0)])[0])


def test_select_concepts_ranks_then_weights():
    real = torch.tensor([10.0, 9.0, 8.0])
    acts = [torch.tensor([1.0, 0.5]), torch.tensor([9.5, 7.0]), torch.tensor([5.0])]
    sel = select_concepts(["bad", "good", "mid"], real, acts, beta=5)
    assert [s.concept for s in sel] == ["good", "mid", "bad"] and sel[0].final == 3 and sel[0].weight == 1
    # the image-image weight can overturn a close rank order
    emb_real = torch.tensor([[1.0, 0.0]] * 3)
    embs = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.1, 1.0], [0.1, 1.0]]), torch.tensor([[1.0, 0.2]])]
    sel = select_concepts(["bad", "good", "mid"], real, acts, emb_real, embs, keep=2)
    assert [s.concept for s in sel] == ["mid", "bad"] and len(sel) == 2
    with pytest.raises(ValueError, match="2 activation"):
        select_concepts(["a", "b", "c"], real, acts[:2])


# ------------------------------------------------------------------------------------ stage 2: candidates
def test_clean_concept_and_seeded_rounds():
    assert clean_concept('Concept: "Red Striped Circles."\nbecause ...') == "red striped circles"
    assert clean_concept("one two three four five six seven") == "one two three four five"
    assert clean_concept("  \n ") == ""
    seen = []

    def summ(captions, seed):
        seen.append((tuple(captions), seed))
        return captions[0]

    caps = ["a", "b", "c", "d", "e"]
    c1 = candidate_concepts(caps, summ, rounds=5, seed=3)
    first = list(seen)
    seen.clear()
    assert candidate_concepts(caps, summ, rounds=5, seed=3) == c1 and seen == first  # reproducible
    assert len({s for _, s in first}) == 5 and len({c for c, _ in first}) > 1  # shuffled each round
    assert len(c1) == len(set(c1))


def test_ground_truth_captioner_describes_what_is_visible():
    ds = ShapesConceptDataset(8, image_size=32, split="val")
    cap = GroundTruthCaptioner(ds)
    s = ds.sample(0)
    label, names = ds.class_names[s["label"]], ds.concept_names
    text = cap.caption(0)
    assert label in text and text.endswith("background")
    texture = [n for i, n in enumerate(names) if ds.concept_categories[i] == "texture" and s["masks"][i].any()][0]
    assert f" {texture} background" in text
    if texture != "plain":  # the pattern's colour is named: the colour of most non-shape pixels
        shapes = [i for i, c in enumerate(ds.concept_categories) if c == "shape"]
        bg = ~s["masks"][shapes].any(0)
        colours = [(int((s["masks"][i] & bg).sum()), n) for i, n in enumerate(names) if ds.concept_categories[i] == "colour"]
        assert f"on a {max(colours)[1]} {texture} background" in text, text
    assert cap([Exemplar(None, 0, None, 1.0)], 0) == [text]
    # a crop with no shape in it still shows its background
    assert cap.caption(0, (0, 0, 2, 2)).endswith("background")
    with pytest.raises(ValueError, match="generated concept data"):
        GroundTruthCaptioner([1, 2, 3])


def test_probe_retriever_with_ground_truth_phrases():
    ds = ShapesConceptDataset(40, image_size=32, split="val")
    probe = ProbeSet(ds, transform=lambda x: x, name="gt")
    gt = GroundTruthScorer.from_dataset(ds)
    r = ProbeRetriever(gt, probe)
    pres = ds.presence_matrix()
    idx = {n: i for i, n in enumerate(ds.concept_names)}
    imgs = r("red circle", 100, seed=0)
    assert len(imgs) == int((pres[:, idx["red"]] * pres[:, idx["circle"]]).sum())
    assert r("zebra", 5, seed=0) == []
    assert len(r("circle", 3, seed=0)) == 3
    assert [np.asarray(i).sum() for i in r("circle", 3, seed=1)] == [np.asarray(i).sum() for i in r("circle", 3, seed=1)]


# ------------------------------------------------------------------------------------ model wrappers
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return build_tiny_captioner(str(root / "captioner")), build_tiny_causal_lm(str(root / "lm"))


@pytest.fixture(scope="module")
def tiny_diffusion(tmp_path_factory):
    return build_tiny_diffusion(str(tmp_path_factory.mktemp("sd") / "pipe"))


class _FakeOpenAI(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        prompt = body["messages"][0]["content"]
        words = [w for w in ("circle", "square", "triangle", "star", "cross", "ring") if w in prompt] or ["shape"]
        answer = f"Concept: {words[body['seed'] % len(words)]}."
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    _FakeOpenAI.requests = []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_hf_wrappers_are_deterministic(tiny_models):
    cap_path, lm_path = tiny_models
    images = [Exemplar(Image.fromarray(np.full((32, 32, 3), v, np.uint8)), 0, None, 1.0) for v in (0, 128, 255)]
    cap = HFCaptioner(cap_path)
    a = cap(images, seed=0)
    assert len(a) == 3 and all(isinstance(t, str) for t in a) and a == cap(images, seed=0)
    summ = HFSummarizer(lm_path)
    s0, s1 = summ(["a red circle", "a blue circle"], 0), summ(["a red circle", "a blue circle"], 1)
    assert s0 == summ(["a red circle", "a blue circle"], 0) and s0 != s1  # seeded sampling


def test_diffusers_generator_is_seeded(tiny_diffusion):
    gen = DiffusersGenerator(tiny_diffusion, num_inference_steps=2)
    a, b, c = gen("red circle", 2, seed=0), gen("red circle", 2, seed=0), gen("red circle", 2, seed=1)
    assert len(a) == 2 and all(isinstance(i, Image.Image) for i in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_missing_models_give_one_clear_error(tmp_path):
    from lwta_vision.dissect.dnd.generative import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"lwta_vision\[dnd\]"):
        require("a_module_that_is_not_installed")
    with pytest.raises(WeightsUnavailableError, match="local folder"):
        HFCaptioner(str(tmp_path / "nope"))
    with pytest.raises(WeightsUnavailableError, match="hf download"):
        HFSummarizer("someone/not-cached-model")


def test_openai_summarizer_against_a_local_server(fake_server):
    s = OpenAISummarizer(fake_server, model="local-llm", api_key_env="")
    assert s(["a red circle", "a green circle"], seed=0) == "Concept: circle."
    path, body = _FakeOpenAI.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "local-llm" and body["seed"] == 0
    assert "a red circle" in body["messages"][0]["content"]
    with pytest.raises(RuntimeError, match="cannot reach"):
        OpenAISummarizer("http://127.0.0.1:9/v1", timeout=2)(["x"], 0)
    with pytest.raises(ValueError, match="http"):
        OpenAISummarizer("127.0.0.1:8080")


# ------------------------------------------------------------------------------------ dissect.py dnd
def _tiny_clip_file(tmp_path):
    import open_clip
    from tiny_clip import register_tiny_clip

    name = register_tiny_clip()
    path = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), path)
    return name, path


def test_dnd_end_to_end_on_tiny_local_models(trained_run, tiny_models, tmp_path):  # noqa: F811
    cap_path, lm_path = tiny_models
    name, clip = _tiny_clip_file(tmp_path)
    out = tmp_path / "dnd"
    args = ["dnd", "--checkpoint", str(trained_run), "--layers", "[layer3, fc]", "--units", "[0, 1, 2]",
            "--max_images", "48", "--captioner", cap_path, "--summarizer", f"hf:{lm_path}", "--rounds", "2",
            "--scorer", "clip", "--clip_model", name, "--clip_pretrained", "null", "--clip_checkpoint", str(clip),
            "--cache_dir", str(tmp_path / "cache"), "--top_images", "4", "--concept_images", "3",
            "--output_dir", str(out), "--device", "cpu", "--seed", "0"]
    res = dissect_main(args)
    rows = list(csv.DictReader(open(out / "layer3.csv")))
    assert [int(r["unit"]) for r in rows] == [0, 1, 2]
    labelled = [r for r in rows if r["label"]]
    assert labelled and all(1 <= len(r["label"].split()) <= 5 for r in labelled)
    detail = json.loads((out / "layer3_dnd.json").read_text())
    unit = next(u for u in detail["units"] if u["active"])
    assert unit["exemplars"] and all(e["caption"] for e in unit["exemplars"])
    assert any(e["box"] is not None for u in detail["units"] for e in u["exemplars"])  # conv layer: crops
    fc = json.loads((out / "fc_dnd.json").read_text())
    assert all(e["box"] is None for u in fc["units"] for e in u["exemplars"])  # fc: no crops
    assert all(s["weight"] != 1.0 for u in fc["units"] for s in u["selection"])  # CLIP weighting applied
    html = (out / "index.html").read_text()
    assert "candidates:" in html and "crop (" in html
    assert json.loads((out / "summary.json").read_text())["meta"]["method"] == "describe_and_dissect"
    # reproducible from the seed
    again = dissect_main(args[:-4] + ["--output_dir", str(tmp_path / "again"), "--device", "cpu", "--seed", "0"])
    assert again == res


def test_dnd_with_an_openai_compatible_server_and_a_diffusion_model(trained_run, tiny_models, tiny_diffusion,  # noqa: F811
                                                                   fake_server, tmp_path):
    cap_path, _ = tiny_models
    out = tmp_path / "dnd"
    res = dissect_main(["dnd", "--checkpoint", str(trained_run), "--layers", "[fc]", "--max_images", "48",
                        "--captioner", cap_path, "--summarizer", f"openai:{fake_server}",
                        "--summarizer_model", "tiny", "--rounds", "3", "--top_images", "4",
                        "--concept_images", "4", "--generator", tiny_diffusion, "--generator_steps", "2",
                        "--output_dir", str(out), "--device", "cpu", "--html", "false"])
    labels = [r["label"] for r in csv.DictReader(open(out / "fc.csv")) if r["active"] == "True"]
    assert len(_FakeOpenAI.requests) == 3 * len(labels) and len(res["fc"]) == 6
    assert labels and all(l in {"circle", "square", "triangle", "star", "cross", "ring", "shape"} for l in labels)
    meta = json.loads((out / "summary.json").read_text())["meta"]
    # on the generated data the default scorer is the concept CLIP, so DnD weights candidates by CLIP
    # image-image similarity as the method prescribes
    assert meta["weighting"] == "clip image-image" and meta["concept_images"] == tiny_diffusion
    sel = [s for u in json.loads((out / "fc_dnd.json").read_text())["units"] for s in u["selection"]]
    assert sel and all(s["rank_score"] < float("inf") for s in sel)  # generated images were ranked


@pytest.mark.parametrize("argv, match", [
    (["--summarizer", "gpt4"], "hf:<model folder"),
    (["--rounds", "0"], ">= 1"),
    (["--captioner", "/no/such/captioner"], "captioning model"),
    (["--units", "[99]"], "out of range"),
])
def test_dnd_bad_inputs(argv, match, trained_run, tiny_models, fake_server, tmp_path, capsys):  # noqa: F811
    base = ["dnd", "--checkpoint", str(trained_run), "--layers", "[fc]", "--max_images", "16", "--device", "cpu",
            "--captioner", "ground_truth", "--summarizer", f"openai:{fake_server}", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        dissect_main(base + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_describe_layer_is_the_same_in_unit_chunks_and_crops_are_scored_by_the_unit(trained_run):  # noqa: F811
    from lwta_vision.checkpoints import load_network
    from lwta_vision.dissect.dnd.generative import GeneratedConceptImages, caption_concepts
    from lwta_vision.dissect.dnd.selection import describe_layer, layer_activations
    from lwta_vision.dissect.pipeline import record_probe
    from lwta_vision.dissect_cli.loading import instantiate as _instantiate
    from lwta_vision.dissect_cli.loading import run_config as _run_config

    net, _ = load_network(str(trained_run))
    probe = _instantiate(_run_config(str(trained_run))["data"]).probe_set("val").first(48)
    rec = record_probe(net, ["layer3"], probe, top_k=4)["layer3"]
    kw = dict(captioner=GroundTruthCaptioner(probe.dataset), summarizer=None,
              concept_images=GeneratedConceptImages(image_size=32, pool_size=200),
              units=[0, 1, 2, 3, 4], top_images=4, keep_images=6, num_concept_images=3,
              candidates_fn=caption_concepts(probe.dataset.concept_names))
    whole = describe_layer(net, "layer3", probe, rec, unit_chunk=64, **kw)
    chunked = describe_layer(net, "layer3", probe, rec, unit_chunk=2, **kw)
    assert [(d.label, d.candidates, [e.box for e in d.exemplars]) for d in whole] == \
           [(d.label, d.candidates, [e.box for e in d.exemplars]) for d in chunked]
    crops = [(d.unit, e) for d in whole for e in d.exemplars if e.box is not None]
    assert crops
    acts = layer_activations(net, "layer3", [e.image for _, e in crops], probe.transform)
    assert all(abs(float(acts[k, u]) - e.activation) < 1e-5 for k, (u, e) in enumerate(crops))
    for d in whole:  # kept exemplars are sorted by activation, each unit's own
        assert [e.activation for e in d.exemplars] == sorted((e.activation for e in d.exemplars), reverse=True)


def test_retrieved_images_reuse_recorded_activations_with_the_same_result(trained_run):  # noqa: F811
    from lwta_vision.checkpoints import load_network
    from lwta_vision.dissect.dnd.generative import caption_concepts
    from lwta_vision.dissect.dnd.selection import describe_layer
    from lwta_vision.dissect.pipeline import record_probe
    from lwta_vision.dissect_cli.loading import instantiate as _instantiate
    from lwta_vision.dissect_cli.loading import run_config as _run_config

    net, _ = load_network(str(trained_run))
    probe = _instantiate(_run_config(str(trained_run))["data"]).probe_set("val").first(48)
    rec = record_probe(net, ["fc"], probe, top_k=4)["fc"]
    retriever = ProbeRetriever(GroundTruthScorer.from_dataset(probe.dataset), probe)
    kw = dict(captioner=GroundTruthCaptioner(probe.dataset), summarizer=None, top_images=4, keep_images=4,
              num_concept_images=3, candidates_fn=caption_concepts(probe.dataset.concept_names))
    reused = describe_layer(net, "fc", probe, rec, concept_images=retriever, **kw)  # activations from the record
    recomputed = describe_layer(net, "fc", probe, rec, concept_images=lambda *a, **k: retriever(*a, **k), **kw)
    pairs = [(s.concept, s.rank_score) for d in reused for s in d.selection]
    assert pairs and pairs == [(s.concept, s.rank_score) for d in recomputed for s in d.selection]
