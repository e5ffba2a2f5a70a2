"""The README's promise, measured: the quickstart, trained for its default epochs through train.py, gets
its final layer labelled with the class names by `dissect.py evaluate` with the concept CLIP (CLIP-Dissect
proper, the default): top-1 = 100%, every label that ties on its score decided by the contrast key with a
margin far above rounding; the ground-truth scorer (the reference) gets at least 5/6. The same network then measures Describe-and-Dissect's
selection stage (ground-truth captions, every caption concept a candidate, generated concept images) on
the logits and on the class log-probabilities: see RESULTS.md §3 for what it recovers and why.

Takes ~4 minutes on 2 CPU cores (the quickstart itself); it is the one long test kept in CI because it is
the project's headline claim. What it asserts holds on seeds 0, 1 and 2 with a margin (RESULTS.md §0).
"""
import sys
from pathlib import Path

from lwta_vision.cli import cli_main
from lwta_vision.dissect_cli import main as dissect_main

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]
MIN_TIE_MARGIN = 0.1  # nats of contrast between a tied label and its best tied rival (100 x the tie tolerance)


def test_quickstart_final_layer_labels_are_the_class_names(tmp_path):
    cli = cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.callback_metrics["val/acc"] > 0.8
    # the callback labelled fc with the concept CLIP during training
    dissection = next(c for c in cli.trainer.callbacks if type(c).__name__ == "NeuronDissection")
    assert type(dissection.scorer).__name__ == "ConceptCLIPScorer"
    ckpt = next(tmp_path.glob("**/checkpoints/last.ckpt"))
    clip = dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null"])
    gt = dissect_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--sentence_model", "null",
                       "--scorer", "ground_truth"])
    assert clip["scorer"] == "ConceptCLIPScorer" and gt["scorer"] == "GroundTruthScorer"
    assert clip["labels"] == CLASSES, clip  # 18/18 over seeds 0-2
    # soft-WPMI saturates, so many class labels tie on the score; each is decided by the contrast key by far
    # more than rounding (measured: the smallest lead over seeds 0-2 is 10.6 nats with CLIP, 12.3 with
    # ground truth; 1.47 and 1.23 on the networks of the earlier data loader)
    for m in (clip, gt):
        assert "order" not in m["decided_by"], m  # no label left to the concept list's order
        assert m["min_tie_margin"] is None or m["min_tie_margin"] > MIN_TIE_MARGIN, m
    assert gt["top1"] >= 5 / 6, gt  # 18/18 over seeds 0-2 (17/18 with the earlier loader: square -> yellow)

    _dnd_selection_is_measured(ckpt, cli.datamodule, tmp_path / "dnd")


def _dnd_selection_is_measured(ckpt, dm, out):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dnd_selection import measure

    r = measure(ckpt, out)
    # every unit's top captions mention several shapes, colours and textures: selection faces distractors
    assert r["min_candidates"] >= 5, r
    # the selection agrees with a direct measurement of what each unit prefers
    assert r["agree_with_direct"] >= r["units"] - 1, r
    # on the logits DnD misses a class or two (RESULTS.md §3): 5/6 on the networks of the reference layer's noise
    # (square -> circle or pink); with the fused kernel's noise 4/6 on seed 0 (square -> circle, cross -> yellow)
    # and 5/6 on seeds 1 and 2
    assert r["class_recovered"] >= r["units"] - 2, r
    # on the class log-probabilities every class is recovered (RESULTS.md §3: 24/24 over four networks)
    lp = measure(ckpt, out.with_name("dnd_log_softmax"), layer="log_softmax")
    assert lp["agree_with_direct"] == lp["units"] and lp["class_recovered"] == lp["units"], lp
