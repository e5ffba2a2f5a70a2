"""Text (soft-WPMI, ground-truth scorer) vs IoU labels on one trained generated-data checkpoint, over the
text labeling's knobs: pooling (mean|max), soft-WPMI's prior weight lambda and top_k (RESULTS.md §1).

    python benchmarks/text_iou_agreement.py runs/quickstart/version_0/checkpoints/last.ckpt --quantile 0.02
"""
from __future__ import annotations

import argparse

from lwta_vision.checkpoints import load_network
from lwta_vision.dissect.clip_dissect.labeling import label_layer
from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer
from lwta_vision.dissect.netdissect.iou import iou_dissect, label_agreement
from lwta_vision.dissect.pipeline import record_probe
from lwta_vision.dissect_cli.loading import instantiate as _instantiate
from lwta_vision.dissect_cli.loading import run_config as _run_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--layers", nargs="+", default=["layer2", "layer3"])
    p.add_argument("--quantile", type=float, default=0.02)
    p.add_argument("--lams", type=float, nargs="+", default=[1.0, 0.5, 0.0])
    p.add_argument("--top_ks", type=int, nargs="+", default=[100, 50])
    args = p.parse_args()
    net, _ = load_network(args.checkpoint)
    probe = _instantiate(_run_config(args.checkpoint)["data"]).probe_set("val")
    concepts = list(probe.dataset.concept_names)
    image_concept = GroundTruthScorer.from_dataset(probe.dataset).similarity(probe, concepts)
    ious = {layer: iou_dissect(net, layer, probe, quantile=args.quantile)[0] for layer in args.layers}
    print(f"{'pooling':<8}{'lambda':>7}{'top_k':>7}  " + "  ".join(f"{layer:>16}" for layer in args.layers))
    for pooling in ("mean", "max"):
        records = record_probe(net, args.layers, probe, top_k=max(args.top_ks), pooling=pooling)
        for lam in args.lams:
            for top_k in args.top_ks:
                cells = []
                for layer in args.layers:
                    text = label_layer(records[layer], image_concept, concepts, "soft_wpmi",
                                       {"lam": lam, "top_k": top_k})
                    a = label_agreement(text, ious[layer])
                    cells.append(f"{a['agree']}/{a['detectors']} = {a['agreement']:.2f}")
                print(f"{pooling:<8}{lam:>7}{top_k:>7}  " + "  ".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
