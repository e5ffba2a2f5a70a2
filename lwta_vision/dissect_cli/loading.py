"""What the ``dissect.py`` subcommands share: the network (a train.py checkpoint or a torchvision model),
the probe set, the scorer and concepts, and the checks that run before anything is loaded."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchvision import transforms as T

from lwta_vision.checkpoints import CheckpointError, load_network
from lwta_vision.concept_clip import is_concept_data
from lwta_vision.datasets.probe import ImageFolderImages, ProbeSet
from lwta_vision.dissect.clip_dissect import CLIPScorer, GroundTruthScorer, WeightsUnavailableError, resolve_device
from lwta_vision.dissect.clip_dissect.similarity import get_similarity
from lwta_vision.dissect.concepts import load_concept_set
from lwta_vision.dissect.recording import LOG_SOFTMAX, expose_log_softmax, resolve_layers

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCORERS = ("auto", "clip", "concept_clip", "ground_truth")
_DEFAULT_CLIP_MODEL = "ViT-B-16"
RANDOM_WEIGHTS = "random"  # --torchvision_weights random: a deliberate untrained baseline
_RANDOM_SEED = 0


def torch_device(device: str) -> torch.device:
    """:func:`resolve_device`, with its error in the command line's words."""
    try:
        return resolve_device(device)
    except ValueError:
        msg = f"--device {device}: CUDA is not available on this machine; use --device cpu or auto"
        raise ValueError(msg) from None


def run_config(checkpoint: str) -> Optional[dict]:
    """The LightningCLI config saved with a run (``config.yaml`` beside or above ``checkpoints/``)."""
    from omegaconf import OmegaConf

    ckpt = Path(checkpoint).resolve()
    for d in (ckpt.parent, ckpt.parent.parent):
        if (d / "config.yaml").is_file():
            return OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=True)
    return None


def instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def recorded_datamodule(checkpoint: str) -> Optional[dict]:
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


def warn_if_other_settings(dm, recorded: dict) -> None:
    """--data given although the checkpoint records its datamodule: say where the settings differ."""
    given = dict(getattr(dm, "hparams", {}) or {})
    diff = {k: (v, given[k]) for k, v in recorded.get("init_args", {}).items() if k in given and given[k] != v}
    if type(dm).__name__ != recorded["class_path"].rpartition(".")[2] or diff:
        keys = ", ".join(f"{k}: trained with {a!r}, given {b!r}" for k, (a, b) in diff.items())
        print(f"warning: --data differs from the datamodule this checkpoint was trained with "
              f"({recorded['class_path']}{'; ' + keys if keys else ''}); labels may not mean what they would on "
              "the training data's settings. Leave out --data to use the recorded one.", file=sys.stderr)


def check_layers(net: nn.Module, layers: list[str]) -> None:
    """Check layer names before any data is touched; ``log_softmax`` adds the class log-probabilities."""
    if LOG_SOFTMAX in layers:
        expose_log_softmax(net)
    resolve_layers(net, layers)


def load_inputs(checkpoint, torchvision_model, torchvision_weights, data, split, max_images, images=None,
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
        print(f"checkpoint {checkpoint}: LWTA noise drawn by {lwta_noise(checkpoint)}", file=sys.stderr)
        recorded = recorded_datamodule(checkpoint)
        if dm is None:
            cfg = run_config(checkpoint)
            if cfg and cfg.get("data"):
                dm = instantiate(cfg["data"])
            elif recorded is not None:
                dm = instantiate(recorded)
        elif recorded is not None:
            warn_if_other_settings(dm, recorded)
        if dm is not None:
            transform, grayscale = dm.eval_transform, dm.in_channels == 1
            if images is not None:
                transform = T.Compose([T.Resize((dm.image_size, dm.image_size)), transform])
        elif images is not None:
            raise ValueError(f"no config.yaml beside {checkpoint!r}; pass --data (the training datamodule) so the "
                             "probe images get the network's preprocessing")
    else:
        net, transform, class_names = load_torchvision_model(torchvision_model, torchvision_weights)
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


def image_folder_images(image_folder: Optional[str]) -> tuple:
    if not image_folder:
        return None, None
    return ImageFolderImages(image_folder), f"folder:{os.path.abspath(image_folder)}"


def torchvision_weights_entry(name: str, weights: Optional[str]):
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


def lwta_noise(checkpoint: str) -> str:
    """The implementation that drew a checkpoint's LWTA training noise, in words (``lwta_vision.layers``)."""
    from lwta_vision.checkpoints import read_checkpoint
    from lwta_vision.layers import describe_implementation

    ckpt = read_checkpoint(checkpoint, mmap=True)
    hp = ckpt.get("hyper_parameters") or {}
    if "lwta_implementation" not in ckpt and "lwta" not in str(hp.get("act")) + str(hp.get("model_kwargs")):
        return "none (no LWTA layers)"
    return describe_implementation(ckpt.get("lwta_implementation"))


def weights_record(checkpoint: Optional[str], torchvision_model: Optional[str],
                    torchvision_weights: Optional[str]) -> Optional[str]:
    """What the network's weights are, for summary.json and the metrics: a random baseline must say so, and a
    checkpoint names the implementation whose LWTA noise trained it."""
    if checkpoint is not None:
        return f"from the checkpoint (LWTA noise drawn by {lwta_noise(checkpoint)})"
    if torchvision_model is None:
        return None
    w = torchvision_weights_entry(torchvision_model, torchvision_weights)
    return f"random (untrained, torch seed {_RANDOM_SEED})" if w is None else str(w)


def load_torchvision_model(name: str, weights: Optional[str]):
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

    w = torchvision_weights_entry(name, weights)
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


CLIP_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_clip_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it (else fp16), fp32 on a CPU, where half precision is slower."""
    if precision not in CLIP_PRECISIONS:
        raise ValueError(f"--clip_precision {precision!r}: choose one of {', '.join(CLIP_PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build_scorer(scorer, probe, clip_model, clip_pretrained, clip_checkpoint, device, cache_dir, batch_size,
                 precision: str = "fp32", num_workers: int = 0):
    """``auto``: the concept CLIP on the generated data (CLIP-Dissect proper), ground truth on other annotated
    data (Broden), else CLIP. ``precision`` and ``num_workers`` (image decoding) are the CLIP encoder's."""
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
                                 batch_size=max(batch_size, 256), precision=precision, num_workers=num_workers)
    if scorer == "ground_truth":
        if not has_gt:
            raise ValueError("scorer 'ground_truth' needs a probe set with concept annotations (the generated "
                             "ConceptDataModule); use --scorer clip for other data")
        return GroundTruthScorer.from_dataset(probe.dataset)
    if scorer == "clip":
        try:
            return CLIPScorer(model_name=clip_model, pretrained=clip_pretrained, checkpoint=clip_checkpoint,
                              device=str(device), cache_dir=cache_dir, batch_size=batch_size, progress=True,
                              precision=precision, num_workers=num_workers)
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(
                f"{err} With dissect.py: download the weights file once on a machine with network access and pass "
                f"--clip_checkpoint /path/to/file (keep --clip_model {clip_model} --clip_pretrained "
                f"{clip_pretrained})") from None
    raise ValueError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")


def check_options(scorer: Optional[str] = None, similarity: Optional[str] = None,
                   output_dir: Optional[str] = None, output_file: Optional[str] = None,
                   tie_tol: Optional[float] = None, holdout: Optional[float] = None) -> None:
    """Fail on a misspelled name or an unwritable output before loading or recording anything."""
    import math

    from lwta_vision.cli import check_output_dir

    if tie_tol is not None and not (math.isfinite(tie_tol) and tie_tol >= 0):
        raise ValueError(f"--tie_tol must be a finite number >= 0 (nats of soft-WPMI), got {tie_tol}")
    if holdout is not None and not 0.0 <= holdout < 1.0:
        raise ValueError(f"--holdout must be a fraction in [0, 1) of the probe images, got {holdout}")

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


def concepts_for(spec: Optional[str], scorer) -> list[str]:
    """The concept set asked for, else the scorer's own annotated concepts, else the 20k words."""
    if spec:
        return load_concept_set(spec)
    return list(getattr(scorer, "concept_names", None) or load_concept_set("20k"))


def require_layers(layers) -> None:
    if not layers:
        raise ValueError("pass the layers to dissect, e.g. --layers '[layer3, fc]' (module paths of the network)")


def last_linear(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the network has no Linear layer; pass --layer")
    return names[-1]
