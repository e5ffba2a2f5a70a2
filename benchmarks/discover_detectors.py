"""DISCOVER's claim on our generated data: do competing (LWTA) units become concept detectors more often?

    python benchmarks/discover_detectors.py --seeds 0 1 2 3 4 --competitors 2 16 --epochs 8      # RESULTS.md §2
    python benchmarks/discover_detectors.py --seeds 0 1 2 --competitors 2 16 --widths 64 128 256 \
        --epochs 8 --epochs-for 16=24 --section discover_wide                                       # §2b

For each seed, trains the quickstart network (convnet_small, widths 32-64-128 by default, max global pool,
AdamW 3e-3 cosine, 8000 generated 32x32 images) with ReLU and with LWTA for each U, to similar accuracy
(a high U learns more slowly: --epochs-for gives it more epochs). Then, per layer, on
the 1000 validation images: Network Dissection (IoU of the top-quantile maps (default 0.02) against shape / colour /
texture masks; detector = IoU > 0.04): number of detectors, unique concepts, mean IoU of detectors; and the
text labels (soft-WPMI with the ground-truth scorer) of the same units, with their agreement with the IoU
label among detectors. Prints a table (mean +- std over seeds) and writes ``results/<section>.json`` and its
tables in RESULTS.md (``benchmarks/results.py``); LWTA uses the layer's defaults (noise_scale, impl), the
stamp says which.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

from lwta_vision.data import ConceptDataModule
from lwta_vision.dissect.clip_dissect.labeling import label_layer
from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer
from lwta_vision.dissect.netdissect.iou import iou_dissect, label_agreement
from lwta_vision.dissect.pipeline import record_probe
from lwta_vision.lit import LitClassifier

LAYERS = ["layer1", "layer2", "layer3"]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def train(act: dict, seed: int, epochs: int, num_train: int,
          widths: list[int]) -> tuple[torch.nn.Module, float, ConceptDataModule]:
    L.seed_everything(seed, verbose=False)
    dm = ConceptDataModule(num_train=num_train, num_val=1000, num_test=200, image_size=32, batch_size=64)
    model = LitClassifier(
        model="convnet_small", model_kwargs={"widths": widths, "global_pool": "max", **act},
        num_classes=dm.num_classes, class_names=dm.class_names,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=5e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
    )
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    acc = trainer.validate(model, dm, verbose=False)[0]["val/acc"]
    return model.model.eval(), acc, dm


def dissect(net, dm, quantile: float) -> dict:
    probe = dm.probe_set("val")
    scorer = GroundTruthScorer.from_dataset(probe.dataset)
    concepts = list(probe.dataset.concept_names)
    P = scorer.similarity(probe, concepts)
    records = record_probe(net, LAYERS, probe, top_k=100)
    out = {}
    for layer in LAYERS:
        iou_labels, _ = iou_dissect(net, layer, probe, quantile=quantile)
        text = label_layer(records[layer], P, concepts)
        agree = label_agreement(text, iou_labels)
        s = iou_labels.summary
        out[layer] = {"units": s["units"], "detectors": s["detectors"], "unique_concepts": s["unique_concepts"],
                      "mean_iou": s["mean_iou"], "per_category": s["per_category"],
                      "agreement": agree["agreement"], "active_units": records[layer].summary()["active_units"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--competitors", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--num-train", type=int, default=8000)
    ap.add_argument("--widths", type=int, nargs=3, default=[32, 64, 128],
                    help="channels of the three conv stages; a high U needs wider layers (U=16 on 32 channels "
                         "leaves 2 active)")
    ap.add_argument("--no-relu", action="store_true", help="skip the ReLU baseline")
    ap.add_argument("--epochs-for", nargs="*", default=[], metavar="VARIANT=EPOCHS",
                    help="per-variant epochs to reach similar accuracy, e.g. 16=24 (U=16) or relu=8")
    ap.add_argument("--section", default="discover", help="results/<section>.json and its RESULTS.md block")
    ap.add_argument("--quantile", type=float, default=0.02,
                    help="NetDissect's 0.005 caps IoU below 0.04 on 32x32 shapes (see RESULTS.md)")
    args = ap.parse_args()
    variants = {} if args.no_relu else {"relu": {"act": "relu"}}
    for u in args.competitors:
        variants[f"lwta U={u}"] = {"act": "lwta", "act_kwargs": {"competitors": u, "temperature": 1.67}}
    epochs = {name: args.epochs for name in variants}
    for item in args.epochs_for:
        key, _, n = item.partition("=")
        name = "relu" if key == "relu" else f"lwta U={key}"
        if name not in variants or not n.isdigit():
            ap.error(f"--epochs-for {item!r}: use relu=N or <U>=N (e.g. 16=24) for a U in --competitors")
        epochs[name] = int(n)
    from lwta_vision.provenance import stamp
    from results import mean_std, write_section

    argv = " ".join(sys.argv[1:])
    st = stamp(f"python benchmarks/discover_detectors.py {argv}".strip(), seeds=args.seeds, widths=args.widths,
               epochs=epochs, num_train=args.num_train, quantile=args.quantile)
    runs = []
    for seed in args.seeds:
        for name, act in variants.items():
            t0 = time.perf_counter()
            net, acc, dm = train(act, seed, epochs[name], args.num_train, args.widths)
            res = dissect(net, dm, args.quantile)
            runs.append({"variant": name, "seed": seed, "epochs": epochs[name], "val_acc": acc, "layers": res})
            print(f"seed {seed} {name:<11} ep {epochs[name]:>2} val/acc {acc:.3f} " + "  ".join(
                f"{l}: det {r['detectors']}/{r['units']} uniq {r['unique_concepts']} iou {r['mean_iou']:.3f} "
                f"agree {r['agreement']:.2f}" for l, r in res.items()) + f"  ({time.perf_counter() - t0:.0f}s)",
                flush=True)

    def ms(vals):
        vals = [v for v in vals if v == v]
        if not vals:
            return "n/a"
        return f"{statistics.mean(vals):.3f} +- {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    print(f"\nmean +- std over seeds {args.seeds}")
    print(f"{'variant':<11}{'val acc':>18}  {'layer':<7}{'detectors':>18}{'unique':>18}{'mean IoU':>18}{'agreement':>18}")
    for name in variants:
        rs = [r for r in runs if r["variant"] == name]
        for layer in LAYERS:
            get = lambda k: [r["layers"][layer][k] for r in rs]  # noqa: E731
            print(f"{name:<11}{ms([r['val_acc'] for r in rs]):>18}  {layer:<7}{ms(get('detectors')):>18}"
                  f"{ms(get('unique_concepts')):>18}{ms(get('mean_iou')):>18}{ms(get('agreement')):>18}")
    table = [f"Mean ± std over seeds {', '.join(map(str, args.seeds))}; widths {args.widths}; epochs "
             + ", ".join(f"{k} {v}" for k, v in epochs.items()) + f"; IoU quantile {args.quantile}, detector IoU > 0.04.",
             "", "| variant | val acc | layer | units | detectors | unique concepts | mean IoU | text-IoU agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for name in variants:
        rs = [r for r in runs if r["variant"] == name]
        for layer in LAYERS:
            get = lambda k: [r["layers"][layer][k] for r in rs]  # noqa: E731
            table.append(f"| {name} | {mean_std(r['val_acc'] for r in rs)} | {layer} | {rs[0]['layers'][layer]['units']} | "
                         f"{mean_std(get('detectors'))} | {mean_std(get('unique_concepts'))} | "
                         f"{mean_std(get('mean_iou'))} | {mean_std(get('agreement'))} |")
    table += ["", "Per run (detectors / units):", "", "| seed | variant | val acc | " + " | ".join(LAYERS) + " |",
              "|---|---|---|" + "---|" * len(LAYERS)]
    for r in runs:
        table.append(f"| {r['seed']} | {r['variant']} | {r['val_acc']:.3f} | " + " | ".join(
            f"{r['layers'][l]['detectors']}/{r['layers'][l]['units']}" for l in LAYERS) + " |")
    print(write_section(args.section, st, {"runs": runs}, "\n".join(table)))


if __name__ == "__main__":
    main()
