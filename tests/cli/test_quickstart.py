"""The README's promise, measured: the quickstart, trained for its default epochs through train.py, gets
its final layer labelled with the class names by `dissect.py evaluate` with the concept CLIP (CLIP-Dissect
proper, the default): top-1 = 100%, every label that ties on its score decided by the contrast key with a
margin far above rounding; the ground-truth scorer (the reference) gets at least 5/6; the labels' held-out
quality is far above chance. The same network then measures Describe-and-Dissect's selection stage
(ground-truth captions, every caption concept a candidate, generated concept images) on the logits and on
the class log-probabilities.

Takes ~2 minutes on 2 CPU cores (the quickstart itself); it is the one long test kept in CI because it is
the project's headline claim. Every bound below is set from RESULTS.md §0 (results/quickstart.json: seeds
0-4 of the current code, `benchmarks/quickstart_seeds.py`), at what held on all five seeds minus the margin
written beside it; CI's machine trains another network from seed 0 (other rounding), so it is one more seed.
"""
import sys
from pathlib import Path

from lwta_vision.cli import cli_main
from lwta_vision.dissect_cli import main as dissect_main

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]
MIN_TIE_MARGIN = 0.1  # nats of contrast between a tied label and its best tied rival (100 x the tie tolerance);
# measured >= 42.9 (CLIP) and >= 46.2 (ground truth) on seeds 0-4


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
    assert clip["labels"] == CLASSES, clip  # the headline: 30/30 over seeds 0-4, asserted exactly
    # soft-WPMI saturates, so many class labels tie on the score; each is decided by the contrast key by far
    # more than rounding
    for m in (clip, gt):
        assert "order" not in m["decided_by"], m  # no label left to the concept list's order
        assert m["min_tie_margin"] is None or m["min_tie_margin"] > MIN_TIE_MARGIN, m
    assert gt["top1"] >= 5 / 6, gt  # 30/30 over seeds 0-4; one unit of margin
    # quality on the held-out half of the probe: measured AUPRC 0.773-0.783 against a base rate of 0.235
    # (lift >= 0.538) with CLIP, 0.694-0.704 against 0.304 (lift >= 0.39) with ground truth
    assert clip["holdout_images"] > 0 and clip["mean_label_auprc"] > clip["mean_label_base_rate"] + 0.3, clip
    assert gt["mean_label_auprc"] > gt["mean_label_base_rate"] + 0.2, gt

    _dnd_selection_is_measured(ckpt, cli.datamodule, tmp_path / "dnd")


def _dnd_selection_is_measured(ckpt, dm, out):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dnd_selection import measure

    r = measure(ckpt, out)
    # every unit's top captions mention several shapes, colours and textures: selection faces distractors
    assert r["min_candidates"] >= 5, r  # measured 9-14 on seeds 0-4
    # the selection agrees with a direct measurement of what each unit prefers: measured 5-6 of 6 on seeds 0-4;
    # one unit of margin
    assert r["agree_with_direct"] >= r["units"] - 2, r
    # on the logits DnD misses a class or two (square -> circle or pink, cross -> yellow): measured 4-5 of 6 on
    # seeds 0-4; one unit of margin
    assert r["class_recovered"] >= r["units"] - 3, r
    # on the class log-probabilities: measured 6/6 on four seeds, 5/6 on seed 2 (cross -> yellow), agreement the
    # same; one unit of margin
    lp = measure(ckpt, out.with_name("dnd_log_softmax"), layer="log_softmax")
    assert lp["agree_with_direct"] >= lp["units"] - 2 and lp["class_recovered"] >= lp["units"] - 2, lp
