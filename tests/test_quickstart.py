"""The README's promise, measured: the quickstart, trained for its default epochs through train.py, gets
its final layer labelled with the class names by `dissect.py evaluate` (ground-truth scorer): top-1 = 100%.
The same network then measures Describe-and-Dissect's selection stage (ground-truth captions, every caption
concept a candidate, generated concept images): see RESULTS.md for what it recovers and why.

Takes ~3-4 minutes on 2 CPU cores (the quickstart itself); it is the one long test kept in CI because it is
the project's headline claim.
"""
import json
from pathlib import Path

from lwta_vision.cli import cli_main
from lwta_vision.dissect_cli import main as dissect_main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_final_layer_labels_are_the_class_names(tmp_path):
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.callback_metrics["val/acc"] > 0.8
    ckpt = next(tmp_path.glob("**/checkpoints/last.ckpt"))
    metrics = dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null"])
    assert metrics["top1"] == 1.0, metrics["labels"]
    assert metrics["labels"] == ["circle", "square", "triangle", "star", "cross", "ring"]

    _dnd_selection_is_measured(ckpt, cli.datamodule, tmp_path / "dnd")


def _dnd_selection_is_measured(ckpt, dm, out):
    from lwta_vision.checkpoints import load_network
    from lwta_vision.dissect.dnd import layer_activations
    from lwta_vision.dissect.generative import GeneratedConceptImages

    res = dissect_main(["dnd", "--checkpoint", str(ckpt), "--layers", "[fc]", "--captioner", "ground_truth",
                        "--summarizer", "ground_truth", "--generator", "ground_truth", "--output_dir", str(out),
                        "--device", "cpu", "--html", "false"])
    units = res["fc"]
    classes = list(dm.class_names)
    # every unit's top captions mention several shapes, colours and textures: selection faces distractors
    assert all(len(u["candidates"]) >= 5 for u in units)
    # the selection agrees with a direct measurement of each unit: the candidate whose generated images
    # excite the unit most on average (50 fresh images per concept)
    images = GeneratedConceptImages(image_size=dm.image_size, seed=1)
    model, _ = load_network(str(ckpt))
    transform = dm.probe_set("val").transform
    concepts = sorted({c for u in units for c in u["candidates"]})
    mean = {c: layer_activations(model, "fc", images(c, 50, 0), transform).mean(0) for c in concepts}
    agree = [u["label"] == max(u["candidates"], key=lambda c: float(mean[c][u["unit"]])) for u in units]
    recovered = [u["label"] == classes[u["unit"]] for u in units]
    summary = {"agree_with_direct": sum(agree), "class_recovered": sum(recovered), "units": len(units),
               "labels": [u["label"] for u in units]}
    (out / "measured.json").write_text(json.dumps(summary))
    assert sum(agree) >= len(units) - 1, summary
    assert sum(recovered) >= len(units) - 1, summary  # RESULTS.md: 5/6 or 6/6; the 90% target needs 6/6
