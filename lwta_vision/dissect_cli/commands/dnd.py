"""``dissect.py dnd``: Describe-and-Dissect free-text descriptions of units."""
from __future__ import annotations

from typing import Optional

from lwta_vision.data.base import VisionDataModule
from lwta_vision.dissect.clip_dissect.clip import CLIPScorer
from lwta_vision.dissect.pipeline import record_probe
from lwta_vision.dissect_cli.loading import (
    build_scorer,
    check_layers,
    check_options,
    image_folder_images,
    load_inputs,
    require_layers,
    resolve_clip_precision,
    torch_device,
    weights_record,
)


def dnd(
    layers: Optional[list[str]] = None,
    checkpoint: Optional[str] = None,
    torchvision_model: Optional[str] = None,
    torchvision_weights: Optional[str] = "DEFAULT",
    data: Optional[VisionDataModule] = None,
    split: str = "val",
    image_folder: Optional[str] = None,
    max_images: Optional[int] = None,
    units: Optional[list[int]] = None,
    captioner: str = "Salesforce/blip-image-captioning-base",
    summarizer: str = "hf:Qwen/Qwen2.5-1.5B-Instruct",
    summarizer_model: str = "default",
    api_key_env: str = "OPENAI_API_KEY",
    generator: Optional[str] = None,
    generator_steps: int = 25,
    scorer: str = "auto",
    clip_model: str = "ViT-B-16",
    clip_pretrained: Optional[str] = "openai",
    clip_checkpoint: Optional[str] = None,
    clip_precision: str = "auto",
    num_workers: int = 0,
    cache_dir: Optional[str] = None,
    rounds: int = 5,
    beta: int = 5,
    top_images: int = 10,
    concept_images: int = 10,
    max_crops: int = 4,
    seed: int = 0,
    pooling: str = "mean",
    token_pooling: str = "cls",
    output_dir: str = "outputs/dnd",
    html: bool = True,
    batch_size: int = 64,
    device: str = "auto",
) -> dict:
    """Describe-and-Dissect: free-text neuron descriptions from captions of attention crops, summarised by a
    language model, the best candidate chosen by how the neuron responds to images of it.

    Args:
        torchvision_weights: DEFAULT, IMAGENET1K_V1, ... (the model's weights enum), or ``random`` for a
            deliberate untrained baseline (announced on stderr, recorded as ``weights``); null is refused.
        units: unit indices to describe (default every unit that won on the probe set; DnD is slow per unit).
        captioner: a transformers image-to-text model (local folder or hub name, BLIP-style), or
            ``ground_truth``: a test double describing the visible shapes/colours/textures of the generated
            concept data from its masks.
        summarizer: ``hf:<folder or hub name>`` (a local causal LM), or ``openai:<base URL>`` for any
            OpenAI-compatible chat endpoint (llama.cpp, vLLM), e.g. ``openai:http://127.0.0.1:8080/v1``;
            ``summarizer_model`` names the model on that endpoint, the key is read from ``$api_key_env``.
            ``ground_truth`` (generated data): every annotated concept the captions mention is a candidate,
            a test double that measures the selection stage with all distractors present.
        generator: a diffusers text-to-image pipeline (folder or hub name) making "One realistic image of
            <concept>"; ``ground_truth`` (generated data): fresh generated images whose main object has the
            concept; default: retrieve the concept's images from the probe set with ``scorer``.
        generator_steps: denoising steps of the diffusers pipeline.
        scorer: what retrieves concept images (auto: ground truth on annotated data, else CLIP); a CLIP
            scorer also weights candidates by image-image similarity (the ground-truth scorer cannot: every
            weight is then 1).
        rounds: summaries per unit (captions shuffled each time). beta: images per candidate in the rank score.
        top_images: probe images per unit before cropping; concept_images: images per candidate.
        seed: seeds captioning, summarising, generation and retrieval tie-breaks.
        clip_precision: the CLIP encoder's: auto (bf16 or fp16 on a GPU, fp32 on a CPU), fp32, fp16, bf16.
        num_workers: DataLoader workers decoding the probe images (for the network and for CLIP).
    """
    from lwta_vision.dissect.dnd import generative as G
    from lwta_vision.dissect.dnd import selection as D

    dev = torch_device(device)
    precision = resolve_clip_precision(clip_precision, dev)  # checked before anything is loaded
    require_layers(layers)
    check_options(scorer, None, output_dir)
    kind, _, target = summarizer.partition(":")
    if summarizer != "ground_truth" and (kind not in ("hf", "openai") or not target):
        raise ValueError(f"--summarizer {summarizer!r}: use hf:<model folder or hub name>, openai:<base URL> or "
                         "ground_truth")
    if rounds < 1 or beta < 1 or top_images < 1 or concept_images < 1:
        raise ValueError("--rounds, --beta, --top_images and --concept_images must be >= 1")
    summ = (G.OpenAISummarizer(target, summarizer_model, api_key_env) if kind == "openai" else None)
    net, probe, _ = load_inputs(checkpoint, torchvision_model, torchvision_weights, data, split, max_images,
                          *image_folder_images(image_folder))
    net = net.to(dev)
    check_layers(net, layers)
    if captioner == "ground_truth":
        cap = G.GroundTruthCaptioner(probe.dataset)
    else:
        cap = G.HFCaptioner(captioner, device=str(dev))
    candidates_fn = None
    if summarizer == "ground_truth":
        candidates_fn = G.caption_concepts(getattr(probe.dataset, "concept_names", None))
    elif summ is None:
        summ = G.HFSummarizer(target, device=str(dev))
    sc = build_scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, dev, cache_dir, batch_size,
                      precision, num_workers)
    if generator == "ground_truth":
        if not hasattr(probe.dataset, "concept_categories"):
            raise ValueError("--generator ground_truth needs the generated concept data; pass a diffusers model")
        images = G.GeneratedConceptImages(image_size=probe.raw(0).width, seed=seed)
    elif generator:
        images = G.DiffusersGenerator(generator, device=str(dev), num_inference_steps=generator_steps)
    else:
        images = D.ProbeRetriever(sc, probe)
    embedder = G.clip_image_embedder(sc) if isinstance(sc, CLIPScorer) else None
    records = record_probe(net, layers, probe, max(top_images, 1), pooling, token_pooling, batch_size, num_workers,
                           dev, progress=True)
    results = {}
    for layer in layers:
        results[layer] = D.describe_layer(
            net, layer, probe, records[layer], cap, summ, images, embedder, units, rounds, beta, top_images,
            top_images, concept_images, max_crops, seed, candidates_fn, pooling=pooling, token_pooling=token_pooling,
            device=dev, batch_size=batch_size, progress=True)
    meta = {"method": "describe_and_dissect", "checkpoint": checkpoint, "torchvision_model": torchvision_model,
            "weights": weights_record(checkpoint, torchvision_model, torchvision_weights), "probe": probe.name,
            "num_images": len(probe), "captioner": captioner, "summarizer": summarizer,
            "concept_images": generator or f"retrieved from the probe set by {type(sc).__name__}",
            "weighting": "clip image-image" if embedder else "none", "seed": seed, "rounds": rounds, "beta": beta}
    D.write_dnd_report(output_dir, results, records, meta, html)
    for layer, descs in results.items():
        for d in descs:
            if d.active:
                print(f"{layer} unit {d.unit}: {d.label}  (candidates: {', '.join(d.candidates) or 'none'})")
    print(f"wrote {output_dir}/ ({'index.html, ' if html else ''}<layer>.csv/.json, <layer>_dnd.json, summary.json)")
    return {layer: [{"unit": d.unit, "label": d.label, "candidates": d.candidates} for d in descs]
            for layer, descs in results.items()}
