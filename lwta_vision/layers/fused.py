"""Fused LWTA for CPU tensors: one pass forward, one pass backward, only the input saved.

The reference layer (``lwta.py``) is a chain of torch ops: noise, logs, block max, compare, softmax, multiply,
each a trip through memory, and it keeps x, the softmax and the winner mask for backward. The fused kernel
(``_fused_lwta.cpp``) draws its noise from a counter-based hash of a 64-bit seed, so backward draws the same
noise again instead of storing it; it keeps x and the seed only.

- Same function: for the same noise (``noise_for``) the forward equals the reference bit for bit (NaN inputs
  aside) and the gradients agree to float rounding (tests/layers/test_fused.py). The seed comes from torch's generator, so
  ``torch.manual_seed`` still makes a run reproducible; the draws differ from the reference's, the
  distribution does not.
- Built on first use with the compiler torch's C++ extensions use (g++ and ninja), once per machine and torch
  version, under ``TORCH_EXTENSIONS_DIR``. Without a compiler the layer warns once and runs the reference.
- A ``torch.library`` custom op with a fake kernel: ``torch.compile`` keeps it as one node (no graph break), and
  the seed is a tensor input so a compiled graph does not bake one in.
- CPU only: CUDA tensors, float64 and strided layouts other than contiguous and channels-last use the
  reference. ``LWTA_VISION_FUSED=0`` turns the fused path off everywhere.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_fused_lwta.cpp")
NOISE_VERSION = 3
"""The version of the kernel's random draws: bump it whenever the same seed gives other winners (the hash, the
uniform, the log/exp polynomials). 1: the first kernel; 2: explicit fma in the log and exp polynomials; 3: the
uniform never rounds to 1.0. Checkpoints and run folders record it (``lwta_vision.layers.implementation``)."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lock = threading.Lock()
_ext = None
_error: Optional[str] = None


def _flags() -> list[str]:
    # -ffp-contract=off: no fused multiply-add, so x + s * g rounds as the reference's two torch ops do;
    # -fno-trapping-math lets the branch-free loops vectorise (it changes no result)
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    cap = torch.backends.cpu.get_cpu_capability()  # what torch's own kernels use on this CPU
    if cap in ("AVX2", "AVX512"):  # the name of the build says which, so a shared cache never loads the wrong one
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if cap == "AVX512":  # 16 lanes: alone, U=16 forward+backward 57 -> 41 ms on 128x64x32x32 (AMD EPYC, 2 threads)
        flags += ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mprefer-vector-width=512"]
    return flags


def _build():
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on CPU-only machines: not ours to show
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    try:  # the ninja that installs with the package, also when the venv's bin/ is not on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    # "AVX2", "AVX512", or "NO AVX", "Z VECTOR", ...: an identifier either way
    name = "lwta_vision_fused_" + re.sub(r"\W", "_", torch.backends.cpu.get_cpu_capability().lower())
    try:  # announce a first build (about 30 s), which would otherwise look like a hang
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not (folder / f"{name}.so").exists():
            print(f"lwta_vision: building the fused LWTA kernel in {folder} (once per machine and torch version, "
                  f"about 30 s)", file=sys.stderr, flush=True)
    except Exception:  # a private helper of torch; the notice is optional
        pass
    return cpp_extension.load(
        name=name, sources=[str(_SOURCE)], extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"], verbose=False,
    )


def extension():
    """The compiled kernel module, built on first call; None (with the reason in ``unavailable_reason``)
    when it cannot be built here."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            try:
                _ext = _build()
            except Exception as e:  # no compiler or ninja, or a failed build: the reference still works
                _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
                warnings.warn(
                    f"lwta_vision: the fused LWTA kernel could not be built ({_error}); LWTA layers use the "
                    f"slower reference implementation. It needs a C++ compiler (g++) and ninja "
                    f"(`pip install ninja`); set LWTA_VISION_FUSED=0 to use the reference without this warning.",
                    RuntimeWarning, stacklevel=3,
                )
    return _ext


def unavailable_reason() -> Optional[str]:
    return _error


def _require():
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the fused LWTA kernel is not available here ({_error}); use impl='reference'")
    return ext


def ready() -> bool:
    """Whether the kernel is loaded, without building it: inside ``torch.compile`` tracing a first build would
    break the graph at every layer, so ``lwta()`` then takes the reference (``LitClassifier(compile=True)``
    builds the kernel before compiling)."""
    return _ext is not None


def enabled() -> bool:
    """Whether the fused path may be used (``LWTA_VISION_FUSED`` not set to 0)."""
    return os.environ.get("LWTA_VISION_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def layout(x: Tensor, competitors: int, dim: int) -> Optional[tuple[int, int]]:
    """``(inner, cl_blocks)`` for the kernel: I of the logical (rows, U, I) view, and C / U for a channels-last
    map (0 for a contiguous tensor); None when ``x`` does not fit the kernel (the reference runs instead)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or competitors < 2 or x.numel() == 0:
        return None
    dim = dim % x.ndim
    if x.shape[dim] % competitors:
        return None
    inner = math.prod(x.shape[dim + 1:])
    if x.is_contiguous():
        return inner, 0
    if x.ndim == 4 and dim == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return inner, x.shape[1] // competitors  # N, H, W, C in memory: each block is U adjacent values
    return None


@torch.library.custom_op("lwta_vision::lwta_fused", mutates_args=())
def _forward_op(x: Tensor, seed: Tensor, competitors: int, inner: int, cl_blocks: int, noise_scale: float,
                temperature: float) -> Tensor:
    return _require().forward(x, int(seed), competitors, inner, cl_blocks, noise_scale, temperature)


@_forward_op.register_fake
def _(x, seed, competitors, inner, cl_blocks, noise_scale, temperature):
    return torch.empty_like(x)


@torch.library.custom_op("lwta_vision::lwta_fused_backward", mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, seed: Tensor, competitors: int, inner: int, cl_blocks: int,
                 noise_scale: float, temperature: float) -> Tensor:
    return _require().backward(grad, x, int(seed), competitors, inner, cl_blocks, noise_scale, temperature)


@_backward_op.register_fake
def _(grad, x, seed, competitors, inner, cl_blocks, noise_scale, temperature):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, seed, *args = inputs
    ctx.save_for_backward(x, seed)
    ctx.args = tuple(args)


def _backward(ctx, grad):
    x, seed = ctx.saved_tensors
    return (_backward_op(grad, x, seed, *ctx.args),) + (None,) * (1 + len(ctx.args))


torch.library.register_autograd("lwta_vision::lwta_fused", _backward, setup_context=_setup_context)


def draw_seed(generator: Optional[torch.Generator] = None) -> Tensor:
    """A 62-bit seed from torch's CPU generator (or ``generator``): reproducible under ``torch.manual_seed``."""
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64, generator=generator)


def lwta_fused(x: Tensor, competitors: int, dim: int, temperature: float, noise_scale: float,
               seed: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Hard straight-through LWTA sample of ``x`` (one that ``layout`` accepts) in one fused pass."""
    fits = layout(x, competitors, dim)
    if fits is None:
        raise ValueError(f"fused LWTA takes contiguous or channels-last CPU tensors of "
                         f"{', '.join(map(str, _DTYPES))}; got {x.dtype} on {x.device}, strides {x.stride()}")
    if seed is None:
        seed = draw_seed(generator)
    return _forward_op(x, seed, competitors, *fits, float(noise_scale), float(temperature))


def noise_for(x: Tensor, competitors: int, dim: int, seed: Tensor) -> Tensor:
    """The unscaled noise ``lwta_fused`` draws for ``seed``, in the logical order of ``x`` (whatever its memory
    format): Gumbel(0, 1) of ``x``'s shape, or for U = 2 one Logistic(0, 1) per block (``x`` with ``dim``
    halved), as ``lwta(..., noise=)`` takes it."""
    fits = layout(x, competitors, dim)
    if fits is None:
        raise ValueError(f"fused LWTA takes contiguous or channels-last CPU tensors of "
                         f"{', '.join(map(str, _DTYPES))}; got {x.dtype} on {x.device}, strides {x.stride()}")
    flat = _require().noise(x, int(seed), competitors, fits[0])
    dim = dim % x.ndim
    shape = x.shape if competitors != 2 else x.shape[:dim] + (x.shape[dim] // 2,) + x.shape[dim + 1:]
    return flat.reshape(shape)
