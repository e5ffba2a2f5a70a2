"""Load a trained network from a checkpoint without Lightning: weights-only, with clear errors."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from lwta_vision.models import backbone_kwargs, create_model


class CheckpointError(ValueError):
    pass


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` with one clear error for a missing, truncated or foreign file.

    ``mmap=True`` maps the tensors instead of reading them: a cheap way to check a file and its shapes.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a folder; pass the .ckpt file inside it, "
                              f"e.g. {str(path / 'checkpoints' / 'last.ckpt')!r}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (pass the .ckpt written by train.py, "
                                f"e.g. runs/<name>/version_0/checkpoints/last.ckpt)")
    try:
        # mmap needs the zip format; anything else (legacy pickles, foreign files) is read plainly
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint (truncated, corrupt, or not a checkpoint): "
            f"{first[:200]}"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def _state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("checkpoint has no state_dict of tensors")
    if any(k.startswith("model.") for k in sd):  # LitClassifier stores the backbone under "model."
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_network(
    path: str | Path,
    model: Optional[str] = None,
    model_kwargs: Optional[dict] = None,
    num_classes: Optional[int] = None,
    in_channels: Optional[int] = None,
) -> tuple[nn.Module, dict]:
    """Rebuild the backbone of a train.py checkpoint (or a plain state dict given ``model``) in eval mode.

    Returns the network and the hyper-parameters it was built with (including ``class_names`` when the
    checkpoint has them). Arguments override what the checkpoint records.
    """
    ckpt = read_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters", {}))
    if model is not None:
        hp["model"] = model
    if model_kwargs is not None:
        hp["model_kwargs"] = model_kwargs
        for key in ("act", "act_kwargs"):  # given with the architecture: it replaces the checkpoint's
            if key in model_kwargs:
                hp.pop(key, None)
    if num_classes is not None:
        hp["num_classes"] = num_classes
    if in_channels is not None:
        hp["in_channels"] = in_channels
    if "model" not in hp:
        raise CheckpointError(
            f"{str(path)!r} has no lwta_vision hyper-parameters; pass the architecture (model=..., "
            f"model_kwargs=..., num_classes=...) to load a plain state dict"
        )
    sd = _state_dict(ckpt)
    kwargs = backbone_kwargs(hp.get("model_kwargs"), hp.get("act"), hp.get("act_kwargs"))
    if "num_classes" in hp:
        kwargs["num_classes"] = hp["num_classes"]
    if "in_channels" in hp:
        kwargs["in_channels"] = hp["in_channels"]
    net = create_model(hp["model"], **kwargs)
    missing, unexpected = _compare(net.state_dict(), sd)
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} does not match architecture {hp['model']!r} with {kwargs}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected or mis-shaped "
            f"(e.g. {unexpected[:3]}). Was it trained with another model or number of classes?"
        )
    net.load_state_dict(sd)
    net.eval()
    return net, hp


def check_resume_checkpoint(path: str | Path, module_state_dict: dict[str, torch.Tensor]) -> None:
    """Fail before training when ``--ckpt_path`` cannot be restored into the module being trained.

    Reads the file memory-mapped (no tensor data is loaded) and compares its ``state_dict`` keys and shapes
    with the LightningModule's, so a truncated file, a foreign file or another architecture gives one
    :class:`CheckpointError` naming the fix instead of a traceback from deep inside Lightning.
    """
    ckpt = read_checkpoint(path, mmap=True)
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise CheckpointError(
            f"{str(path)!r} is not a train.py checkpoint (it has no 'state_dict'; keys: {sorted(ckpt)[:5]}); "
            f"--ckpt_path needs a .ckpt written by train.py, e.g. runs/<name>/version_0/checkpoints/last.ckpt")
    missing, unexpected = _compare(module_state_dict, sd)
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} does not match the model being trained: {len(missing)} missing keys (e.g. "
            f"{missing[:3]}), {len(unexpected)} unexpected or mis-shaped (e.g. {unexpected[:3]}). Resume with the "
            f"config the checkpoint was trained with, same model and data (its run folder holds config.yaml: "
            f"--config that file)")


def _compare(expected: dict, given: dict) -> tuple[list[str], list[str]]:
    missing = [k for k in expected if k not in given]
    bad = [k for k in given if k not in expected or tuple(given[k].shape) != tuple(expected[k].shape)]
    return missing, bad
