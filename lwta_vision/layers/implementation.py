"""Which LWTA implementation draws the training noise here, recorded with every run.

The fused CPU kernel and the reference layer sample the same distribution with different random draws, so the
same seed trains a different network on a machine without a C++ compiler (the reference runs there) or on a
GPU. A run folder, a checkpoint and dissect.py's header say which one drew the noise, with the kernel's
``NOISE_VERSION``, so a figure can be traced to the draws that produced it.
"""
from __future__ import annotations

from typing import Optional

import torch

from lwta_vision.layers import fused

__all__ = ["implementation", "describe"]


def implementation(device: Optional[torch.device | str] = None) -> dict:
    """What a hard LWTA training sample on ``device`` (default CPU) runs: a plain dict for checkpoints.

    ``{"name": "fused_cpu", "noise_version": 3, "cpu_capability": "AVX2", "torch": "2.14.1"}``, or
    ``{"name": "reference", "reason": ..., "torch": ...}``. Building the kernel (once per machine) is part of
    asking on a CPU. Tensors the kernel does not take (float64, odd strides) run the reference on any device.
    """
    device = torch.device(device or "cpu")
    record = {"torch": torch.__version__.split("+")[0]}
    if device.type != "cpu":
        return {"name": "reference", "reason": f"{device.type} tensors (the fused kernel is CPU only)", **record}
    if not fused.enabled():
        return {"name": "reference", "reason": "LWTA_VISION_FUSED=0", **record}
    if fused.extension() is None:
        return {"name": "reference", "reason": f"fused kernel unavailable: {fused.unavailable_reason()}", **record}
    return {"name": "fused_cpu", "noise_version": fused.NOISE_VERSION,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), **record}


def describe(record: Optional[dict]) -> str:
    """One line for consoles and reports."""
    if not record:
        return "not recorded (a checkpoint from before lwta_vision recorded it, or a network without LWTA)"
    torch_version = f", torch {record['torch']}" if record.get("torch") else ""
    if record.get("name") == "fused_cpu":
        return (f"fused CPU kernel, noise v{record.get('noise_version')} ({record.get('cpu_capability')}"
                f"{torch_version})")
    reason = f": {record['reason']}" if record.get("reason") else ""
    if record.get("name") == "mixed":
        return (f"fused CPU kernel, noise v{record.get('noise_version')}, and reference torch ops{reason}"
                f"{torch_version}")
    return f"reference torch ops{reason}{torch_version}"
