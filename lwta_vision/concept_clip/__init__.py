"""A small CLIP that knows the generated concept data, built, trained and loaded only through open_clip.

Nothing ships real CLIP weights offline, yet CLIP-Dissect needs a CLIP. This one is an open_clip
architecture registered from a JSON file (``model_configs/lwta-concept-clip.json``: a small CNN image
tower from :mod:`.trunk`, a 2-layer text transformer, open_clip's BPE tokenizer), trained on generated
images of the ``"clip"`` stream, which no network split ever uses, with captions made from their
annotations (:mod:`.captions`). Its weights ship inside the package (``weights/``, fp16, with their
sha256 and zero-shot accuracy in ``weights/PROVENANCE.json``); retrain with
``python -m lwta_vision.concept_clip --out DIR``.

Use it as any open_clip model::

    from lwta_vision import concept_clip
    name = concept_clip.register()  # the JSON architecture and its timm trunk
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(concept_clip.weights_path()))
    tokenizer = open_clip.get_tokenizer(name)

or as a scorer: :class:`ConceptCLIPScorer` (``dissect.py --scorer concept_clip``, the default on the
generated data), which is :class:`~lwta_vision.dissect.clip_dissect.CLIPScorer` with these weights.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Optional

from lwta_vision.concept_clip.captions import CONCEPT_WORDS

MODEL_NAME = "lwta-concept-clip"
WEIGHTS_FILE = "lwta-concept-clip.safetensors"
PROVENANCE_FILE = "PROVENANCE.json"

__all__ = ["MODEL_NAME", "CONCEPT_WORDS", "ConceptCLIPScorer", "is_concept_data", "register", "weights_path",
           "provenance"]

_registered = False


def register() -> str:
    """Register the architecture with open_clip (and its trunk with timm), once per process; returns its name."""
    global _registered
    import open_clip

    from lwta_vision.concept_clip.trunk import register_trunk

    register_trunk()
    if not _registered or MODEL_NAME not in open_clip.list_models():
        # the folder is inside the installed package and lives as long as the process: open_clip rescans
        # every registered folder whenever another config is added
        open_clip.add_model_config(Path(str(resources.files(__package__).joinpath("model_configs"))))
        _registered = True
    return MODEL_NAME


def _weights_dir() -> Path:
    return Path(str(resources.files(__package__).joinpath("weights")))


def weights_path() -> Path:
    """The shipped weights file; a clear error names the command that makes it when it is missing."""
    path = _weights_dir() / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the concept CLIP's weights are missing from the package ({path}). Train them with "
            f"`python -m lwta_vision.concept_clip --out DIR` and pass --clip_checkpoint DIR/{WEIGHTS_FILE} "
            f"(or reinstall lwta_vision)")
    return path


def provenance() -> dict:
    """How the shipped weights were made: command, seed, sha256, zero-shot accuracy."""
    return json.loads((_weights_dir() / PROVENANCE_FILE).read_text())


def __getattr__(name: str):
    # lazy, so that importing the package does not import the dissection scorers (and open_clip)
    if name == "ConceptCLIPScorer":
        from lwta_vision.concept_clip.scorer import ConceptCLIPScorer

        return ConceptCLIPScorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_concept_data(dataset) -> bool:
    """True for the generated concept data (or a view of it): the images this CLIP was trained to describe."""
    return list(getattr(dataset, "concept_names", None) or []) == list(CONCEPT_WORDS)


def default_checkpoint(checkpoint: Optional[str] = None) -> str:
    """``checkpoint`` if given, else the shipped weights."""
    return str(checkpoint) if checkpoint is not None else str(weights_path())
