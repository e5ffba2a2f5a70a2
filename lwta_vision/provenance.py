"""What shapes a measured figure, so that a result can say what produced it and a test can say when it is stale.

Every results section (``results/*.json``, the tables of RESULTS.md) is stamped with :func:`stamp`: the date,
the commit, torch and the CPU, the LWTA implementation that drew the noise, and :func:`shaping_settings`, the
code's defaults that change a trained network or a label when they change (the LWTA noise and its
implementation's draws, the training loader's order, the concept CLIP's weights, the top-image rule and the
held-out split, the tie tolerance, and the config files the section trains from). ``tests/test_results.py``
compares each section's recorded settings with the current ones and names the stale sections and the command
that regenerates them.
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import platform
import subprocess
from pathlib import Path
from typing import Iterable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def config_sha256(path: Path) -> str:
    """A config file's parsed content, hashed: comments and layout do not make a section stale, values do."""
    import json

    import yaml

    return hashlib.sha256(json.dumps(yaml.safe_load(Path(path).read_text()), sort_keys=True).encode()).hexdigest()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shaping_settings(configs: Iterable[str] = ()) -> dict:
    """The current defaults that shape trained networks and labels, flat ``{name: value}``; ``configs``: config
    files (relative to the repository) whose content the figures depend on, by sha256."""
    from lwta_vision.concept_clip import provenance as concept_clip_provenance
    from lwta_vision.data.base import EpochShuffleSampler
    from lwta_vision.dissect import ranking
    from lwta_vision.dissect.clip_dissect.labeling import HOLDOUT
    from lwta_vision.dissect.evaluate import quality
    from lwta_vision.dissect.labels import TIE_TOL
    from lwta_vision.layers import LWTA, fused

    settings = {
        "lwta.noise_scale": _default(LWTA, "noise_scale"),
        "lwta.temperature": _default(LWTA, "temperature"),
        "lwta.eval_mode": _default(LWTA, "eval_mode"),
        "lwta.impl": _default(LWTA, "impl"),
        "lwta.fused_noise_version": fused.NOISE_VERSION,
        "loader.order_version": EpochShuffleSampler.ORDER_VERSION,
        "concept_clip.weights_sha256": concept_clip_provenance()["sha256"],
        "labels.top_image_rule": ranking.RULE_VERSION,
        "labels.tie_tol": TIE_TOL,
        "labels.holdout": HOLDOUT,
        "labels.split_version": quality.SPLIT_VERSION,
    }
    for name in configs:
        settings[f"config.{name}"] = config_sha256(ROOT / name)
    return settings


def _commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "lwta_vision", "configs", "benchmarks"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+uncommitted" if dirty else "")) if out.returncode == 0 else None


def stamp(command: str, configs: Iterable[str] = (), **extra) -> dict:
    """Everything a results section records about what produced it (``extra``: the section's own settings,
    e.g. seeds and epochs)."""
    from lwta_vision.layers import describe_implementation, implementation

    lwta = implementation()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "command": command,
        "torch": torch.__version__,
        "cpu": _cpu(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "lwta_implementation": lwta,
        "lwta_noise": describe_implementation(lwta),
        "settings": shaping_settings(configs),
        "configs": list(configs),
        **extra,
    }


def stale_settings(recorded: dict) -> dict:
    """``{name: (recorded, current)}`` for each recorded shaping setting that differs from the code's now."""
    current = shaping_settings(recorded.get("configs", ()))
    old = recorded.get("settings", {})
    return {k: (old.get(k), current[k]) for k in current if old.get(k) != current[k]}
