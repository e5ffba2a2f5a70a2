"""``dissect.py describe``: CLIP-Dissect labels for every unit of the chosen layers, with CSV/JSON/HTML reports."""
from __future__ import annotations

from typing import Optional

from lwta_vision.callbacks.dissection import console_line
from lwta_vision.data.base import VisionDataModule
from lwta_vision.dissect.clip_dissect.labeling import HOLDOUT, label_records
from lwta_vision.dissect.labels import TIE_TOL
from lwta_vision.dissect.pipeline import record_probe, write_report
from lwta_vision.dissect_cli.loading import (
    build_scorer,
    check_layers,
    check_options,
    concepts_for,
    image_folder_images,
    load_inputs,
    require_layers,
    resolve_clip_precision,
    torch_device,
    weights_record,
)


def describe(
    layers: Optional[list[str]] = None,
    checkpoint: Optional[str] = None,
    torchvision_model: Optional[str] = None,
    torchvision_weights: Optional[str] = "DEFAULT",
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
    pooling: str = "mean",
    token_pooling: str = "cls",
    output_dir: str = "outputs/dissect",
    images_per_unit: int = 5,
    html: bool = True,
    batch_size: int = 64,
    device: str = "auto",
    tie_tol: float = TIE_TOL,
    holdout: float = HOLDOUT,
) -> dict:
    """Label every unit of ``layers`` and write ``<layer>.csv/.json``, ``summary.json`` and ``index.html``.

    Args:
        layers: module paths in the network, e.g. ``[layer3, fc]`` (``layer4.1.act2``, ``blocks.11.mlp.act``);
            ``log_softmax``: the class log-probabilities (a logit is meaningful only relative to the image's
            other logits).
        checkpoint: a .ckpt written by train.py (its run's config.yaml supplies the datamodule).
        torchvision_model: instead of a checkpoint, a torchvision model name (pretrained weights by
            ``torchvision_weights``; they must be downloadable or already cached).
        torchvision_weights: the weights of ``torchvision_model``: an entry of its weights enum (DEFAULT,
            IMAGENET1K_V1, ...; downloaded once into $TORCH_HOME/hub/checkpoints, or already there), or
            ``random`` for a deliberate untrained baseline (announced on stderr and recorded as the run's
            ``weights``); null is refused.
        data: a datamodule (``class_path`` + ``init_args``) overriding the one saved with the run.
        split: probe split of the datamodule (val, test, train).
        image_folder: probe on every image under this folder instead.
        max_images: probe on the first n images only.
        concepts: concept set: 20k, imagenet1k, cifar10, cifar100, generated, broden:<dir>, or a text file;
            default: the ground-truth concepts with the ground-truth scorer, else 20k.
        scorer: auto (the concept CLIP on the generated data, ground truth on Broden, else CLIP), clip,
            concept_clip (the small CLIP shipped with lwta_vision, see ``lwta_vision.concept_clip``),
            ground_truth (the data's own annotations: the reference).
        clip_model, clip_pretrained, clip_checkpoint: the open_clip model and its weights (a local file
            with clip_checkpoint works offline); with concept_clip, clip_checkpoint replaces the shipped
            weights.
        cache_dir: where CLIP embeddings are cached (default $LWTA_VISION_CACHE or ~/.cache/lwta_vision).
        clip_precision: the CLIP encoder's: auto (bf16 or fp16 on a GPU, fp32 on a CPU), fp32, fp16, bf16.
        num_workers: DataLoader workers decoding the probe images (for the network and for CLIP).
        similarity: soft_wpmi (default), wpmi, cos_similarity, cos_similarity_cubed, rank_reorder.
        pooling: conv maps per image: mean or max. token_pooling: ViT tokens: cls or mean.
        output_dir: everything is written here.
        tie_tol: soft-WPMI/WPMI scores closer than this are ties, decided by the contrast of the unit's
            log p(t|k) with the layer's mean, then by concept order; every row reports its ``margin``,
            ``decided_by`` and ``tie_margin``.
        holdout: fraction of the probe images that never choose a label; each label's quality (``label_corr``,
            ``label_auprc``, F1/IoU at the top 0.5% and 2%) is measured on them, its in-sample figures are
            ``*_insample`` (0: choose on all images, in-sample figures only).
    """
    dev = torch_device(device)
    precision = resolve_clip_precision(clip_precision, dev)  # checked before anything is loaded
    require_layers(layers)
    check_options(scorer, similarity, output_dir, tie_tol=tie_tol, holdout=holdout)
    net, probe, class_names = load_inputs(checkpoint, torchvision_model, torchvision_weights, data, split, max_images,
                                    *image_folder_images(image_folder))
    net = net.to(dev)
    check_layers(net, layers)
    sc = build_scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, dev, cache_dir, batch_size,
                      precision, num_workers)
    concept_list = concepts_for(concepts, sc)
    top_k = max(int((similarity_kwargs or {}).get("top_k", 100)), images_per_unit)
    records = record_probe(net, layers, probe, top_k, pooling, token_pooling, batch_size, num_workers, dev,
                           progress=True)
    image_concept = sc.image_concept(probe, concept_list)
    results = label_records(records, image_concept, concept_list, similarity, similarity_kwargs, tie_tol, dev,
                            holdout=holdout)
    meta = {"checkpoint": checkpoint, "torchvision_model": torchvision_model,
            "weights": weights_record(checkpoint, torchvision_model, torchvision_weights), "probe": probe.name,
            "num_images": len(probe), "concepts": concepts or "scorer default", "num_concepts": len(concept_list),
            "scorer": type(sc).__name__, "similarity": similarity, "holdout": holdout}
    write_report(output_dir, results, probe, net, records, images_per_unit, meta, html, dev)
    for layer, res in results.items():
        s = res.summary
        print(f"{layer}: {console_line(s)}")
    print(f"wrote {output_dir}/ ({'index.html, ' if html else ''}<layer>.csv/.json, summary.json)")
    return {k: v.summary for k, v in results.items()}
