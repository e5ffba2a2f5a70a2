"""Per-epoch cost of the NeuronDissection callback relative to one eval forward pass over the probe set.

    python benchmarks/dissection_overhead.py [--images 1000] [--layers layer3 fc] [--repeats 3]

After the first epoch the image-concept matrix is cached, so an epoch's dissection is: record the layers
(one forward pass with hooks, pooling, running top-k) + soft-WPMI labeling. Both it and a plain eval forward
pass over the same probe loader are timed in alternation (median of repeats). Goal: ratio <= 1.25.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lwta_vision.data import ConceptDataModule
from lwta_vision.dissect.clip_dissect.labeling import label_records
from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer
from lwta_vision.dissect.pipeline import probe_loader
from lwta_vision.dissect.recording import eval_mode, record_activations
from lwta_vision.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--layers", nargs="+", default=["layer3", "fc"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    dm = ConceptDataModule(num_train=16, num_val=args.images, num_test=16, image_size=32)
    probe = dm.probe_set("val")
    net = create_model("convnet_small", num_classes=6, act="lwta", act_kwargs={"competitors": 4},
                       global_pool="max")
    gt = GroundTruthScorer.from_dataset(probe.dataset)
    concepts = list(gt.concept_names)
    P = gt.similarity(probe, concepts)  # computed once per run by the callback
    loader = probe_loader(probe, args.batch_size)
    list(loader)  # warm the data path

    def forward_only() -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), eval_mode(net):
            for x, _ in loader:
                net(x)
        return time.perf_counter() - t0

    def dissection() -> float:
        t0 = time.perf_counter()
        records = record_activations(net, args.layers, loader, top_k=100)
        label_records(records, P, concepts)
        return time.perf_counter() - t0

    fwd, dis = [], []
    forward_only(), dissection()
    for _ in range(args.repeats):
        fwd.append(forward_only())
        dis.append(dissection())
    f, d = statistics.median(fwd), statistics.median(dis)
    print(f"convnet_small LWTA U=4, {args.images} probe images 32x32, layers {args.layers}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"eval forward pass: {f:.3f}s   dissection (record + soft-WPMI): {d:.3f}s   ratio {d / f:.3f}")


if __name__ == "__main__":
    main()
