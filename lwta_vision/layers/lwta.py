"""Stochastic Local-Winner-Takes-All (LWTA) competition.

Units along one dimension are split into consecutive blocks of ``competitors`` (U in the papers). Within a
block the units' own values are the logits of a categorical over "who wins"; exactly one unit per block
passes its value through (it may be negative), the others output zero. Training samples the winner with
the Gumbel-softmax relaxation (straight-through hard one-hot by default), with the Gumbel noise scaled by
``noise_scale`` (0.1: see ``LWTA`` for why); evaluation either samples ("sample", as DISCOVER's code does) or
takes the argmax (deterministic, our default).

Speed: on CPU tensors a hard training sample runs the fused kernel of ``fused.py`` (one pass each way, only the
input kept for backward); the torch ops below are the reference it is tested against and the path everywhere else.

Mixed precision: under bf16/fp16 (autocast or half inputs) the competition itself (noise, relaxed softmax, the
winner) is computed in float32, and only the output, ``x`` times the one-hot winner, has the input's dtype.
Adding Gumbel noise in bf16 (8 significant bits) would round nearby noisy logits to ties and hand those blocks
to the first unit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

EVAL_MODES = ("argmax", "sample")
IMPLS = ("auto", "fused", "reference")


def _blocks(x: Tensor, competitors: int, dim: int) -> tuple[Tensor, int]:
    """View ``x`` with ``dim`` split into (blocks, competitors); returns the view and the competitor axis."""
    dim = dim % x.ndim
    width = x.shape[dim]
    if competitors < 1:
        raise ValueError(f"LWTA competitors must be >= 1, got {competitors}")
    if width % competitors:
        raise ValueError(
            f"LWTA: width {width} (dim {dim} of shape {tuple(x.shape)}) is not divisible by competitors="
            f"{competitors}; choose competitors dividing {width} (e.g. "
            f"{', '.join(str(d) for d in _divisors(width)[:6])})"
        )
    shape = x.shape[:dim] + (width // competitors, competitors) + x.shape[dim + 1:]
    return x.reshape(shape), dim + 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def _competition_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16 inputs (and float32), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _gumbel_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Gumbel(0, 1) noise as -log(-log(U)), in the competition dtype (at least float32) of ``x``.

    Uniform draws plus two logs are about twice as fast on a CPU as ``exponential_``. U is clamped to
    [tiny, 1): -log(U) is then finite and > 0, so the noise is always finite (no inf/NaN in bf16/fp16).
    """
    u = torch.rand(x.shape, device=x.device, dtype=torch.float32, generator=generator)
    g = u.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()
    return g.to(_competition_dtype(x.dtype))


class _HardST(torch.autograd.Function):
    """Straight-through hard sample: value ``x * hard``, gradient of ``x * softmax(z / tau)``.

    ``z`` (the noisy logits) may be float32 while ``x`` is bf16/fp16: the softmax and the gradient w.r.t. ``z``
    stay float32. The winner is the maximum of ``z`` itself, before the division by tau, which cannot change it
    in exact arithmetic but could in rounding (two close values dividing to the same float).

    Same gradients as autograd on ``x * (hard - soft.detach() + soft)``, written out so the softmax is not
    kept in the autograd graph: fewer saved tensors and elementwise kernels. The fused kernel (``fused.py``)
    goes further and saves ``x`` only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, axis: int, inv_tau: float):
        with torch.no_grad():
            zmax = z.amax(axis, keepdim=True)
            hard = _max_mask(z, zmax, axis)
            soft = (z - zmax).mul_(inv_tau).exp_()
            soft /= soft.sum(axis, keepdim=True)
        ctx.save_for_backward(x, soft, hard)
        ctx.axis, ctx.inv_tau = axis, inv_tau
        return x * hard

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, soft, hard = ctx.saved_tensors
        g_soft = grad.to(soft.dtype) * x.to(soft.dtype)
        g_z = g_soft.sub_((g_soft * soft).sum(ctx.axis, keepdim=True)).mul_(soft).mul_(ctx.inv_tau)
        return grad * hard, g_z, None, None


class _PairST(torch.autograd.Function):
    """U = 2 fast path: unit 0 wins iff h0 - h1 + L > 0, L ~ Logistic(0, 1) (the difference of two Gumbels),
    so one random number per block replaces two and the softmax becomes a sigmoid. The comparison and the
    sigmoid run in the dtype of ``noise`` (at least float32)."""

    @staticmethod
    def forward(ctx, x: Tensor, noise: Tensor, axis: int, inv_tau: float):
        with torch.no_grad():
            h0, h1 = x.select(axis, 0).to(noise.dtype), x.select(axis, 1).to(noise.dtype)
            s = (h0 - h1).add_(noise)
            win0 = (s > 0).unsqueeze(axis)
            hard = torch.cat([win0, ~win0], dim=axis)
            soft0 = s.mul_(inv_tau).sigmoid_()
        ctx.save_for_backward(x, soft0, hard)
        ctx.axis, ctx.inv_tau = axis, inv_tau
        return x * hard

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, soft0, hard = ctx.saved_tensors
        axis = ctx.axis
        gx = grad.to(soft0.dtype) * x.to(soft0.dtype)
        c = (gx.select(axis, 0) - gx.select(axis, 1)).mul_(soft0 * (1 - soft0)).mul_(ctx.inv_tau).unsqueeze(axis)
        return (grad * hard + torch.cat([c, -c], dim=axis)).to(x.dtype), None, None, None


def _max_mask(z: Tensor, zmax: Tensor, axis: int) -> Tensor:
    """One-hot of the block maximum, as a boolean mask.

    Comparing with the block max is an order of magnitude faster on a CPU than ``argmax`` along a strided
    channel axis; exact ties (possible without noise, e.g. in "argmax" eval on constant inputs) fall back to
    argmax so that there is still exactly one winner (the first).
    """
    if torch.compiler.is_compiling():  # no data-dependent branch in a compiled graph: argmax (first on ties)
        return torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(axis, z.argmax(axis, keepdim=True),
                                                                                 True)
    mask = z == zmax
    # every block has at least one True; more Trues than blocks means a tie somewhere (one scalar reduction)
    if int(mask.sum()) > zmax.numel():
        idx = z.argmax(dim=axis, keepdim=True)
        mask = torch.zeros_like(mask).scatter_(axis, idx, True)
    return mask


def _noisy(blocks: Tensor, noise_scale: float, generator: Optional[torch.Generator],
           gumbel: Optional[Tensor] = None) -> Tensor:
    """``blocks + noise_scale * Gumbel`` in the competition dtype (no noise drawn when the scale is 0).
    ``gumbel``: standard Gumbel noise to use instead of drawing it."""
    z = blocks.to(_competition_dtype(blocks.dtype))
    if noise_scale == 0:
        return z
    g = _gumbel_like(blocks, generator) if gumbel is None else gumbel.reshape(blocks.shape).to(z.dtype)
    return z + (g if noise_scale == 1 else g * noise_scale)


def _logistic_like(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    u = torch.rand(x.shape, device=x.device, dtype=torch.float32, generator=generator)
    u.clamp_(1e-7, 1 - 1e-7)  # keeps log finite; noise is bounded at |L| <= 16
    return u.div_(1 - u).log_().to(_competition_dtype(x.dtype))


def lwta(
    x: Tensor,
    competitors: int,
    dim: int = -1,
    temperature: float = 1.0,
    training: bool = True,
    hard: bool = True,
    eval_mode: str = "argmax",
    generator: Optional[torch.Generator] = None,
    noise_scale: float = 0.1,
    impl: str = "auto",
    noise: Optional[Tensor] = None,
) -> Tensor:
    """Stochastic LWTA competition (pure function).

    Args:
        x: pre-activations; ``dim`` holds the competing units.
        competitors: units per block (U); ``x.shape[dim]`` must be divisible by it.
        dim: the competition axis: 1 for conv maps (N, C, H, W), -1 for tokens and vectors.
        temperature: Gumbel-softmax temperature. It shapes the relaxation's gradient only: it never
            changes which unit wins a hard sample.
        training: sample with Gumbel noise (relaxed); otherwise use ``eval_mode``.
        hard: straight-through hard one-hot (default); ``False`` outputs ``x * softmax((x + g) / tau)``.
        eval_mode: "argmax" (deterministic winner = largest value) or "sample" (stochastic, as in the
            DISCOVER reference code).
        generator: optional RNG for the Gumbel noise (reproducible sampling).
        noise_scale: scale s of the Gumbel noise: the winner of a sample is argmax(x + s * g), i.e. it is drawn
            from softmax(x / s). 1 is the classic Categorical(softmax(x)); 0 is the deterministic argmax. The
            default 0.1 is explained in ``LWTA``.
        impl: how a hard training sample is computed: "auto" (the fused CPU kernel of ``fused.py`` where it
            applies, else the reference), "fused" (an error where it does not apply) or "reference" (torch ops).
            Both sample the same distribution and give the same gradients; their random draws differ.
        noise: standard noise to use instead of drawing it (reference only): Gumbel(0, 1) of ``x``'s shape, or
            for a hard U = 2 sample one Logistic(0, 1) per block (``x`` with ``dim`` halved). For tests.

    Returns a tensor of ``x``'s shape and dtype; the noisy competition runs in at least float32.
    """
    if competitors == 1:
        return x
    if temperature <= 0:
        raise ValueError(f"LWTA temperature must be > 0, got {temperature}")
    if noise_scale < 0:
        raise ValueError(f"LWTA noise_scale must be >= 0, got {noise_scale}")
    if impl not in IMPLS:
        raise ValueError(f"LWTA impl must be one of {IMPLS}, got {impl!r}")
    blocks, axis = _blocks(x, competitors, dim)
    if not training:
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"LWTA eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        # argmax compares the values themselves (exact in any dtype); sampling adds noise in float32
        logits = blocks if eval_mode == "argmax" or noise_scale == 0 else _noisy(blocks, noise_scale, generator,
                                                                                  noise)
        return (blocks * _max_mask(logits, logits.amax(axis, keepdim=True), axis)).reshape(x.shape)
    if hard and noise is None and impl != "reference":
        from lwta_vision.layers import fused

        fits = fused.enabled() and fused.layout(x, competitors, dim) is not None
        # never a first build inside torch.compile tracing (it would break the graph at every layer)
        built = fits and (fused.ready() or (not torch.compiler.is_compiling() and fused.extension() is not None))
        if built:
            return fused.lwta_fused(x, competitors, dim, temperature, noise_scale, generator=generator)
        if impl == "fused":
            if not fused.enabled():
                why = "LWTA_VISION_FUSED=0"
            elif not fits:
                why = (f"it takes contiguous or channels-last CPU tensors of {', '.join(map(str, fused._DTYPES))}, "
                       f"got a {x.dtype} tensor on {x.device} with strides {x.stride()}")
            else:
                why = fused.unavailable_reason() or ("it is not built yet and this is torch.compile tracing; call "
                                                     "lwta_vision.layers.fused.extension() before compiling")
            raise ValueError(f"LWTA impl='fused' cannot run here: {why}; use impl='auto' to fall back to the "
                             f"reference")
    elif impl == "fused":
        raise ValueError("LWTA impl='fused' computes hard training samples with its own noise; use "
                         "impl='reference' for soft samples or explicit noise")
    if hard and competitors == 2:
        pair = _logistic_like(blocks.select(axis, 0), generator) if noise is None else (
            noise.reshape(blocks.select(axis, 0).shape).to(_competition_dtype(x.dtype)))
        pair = pair if noise_scale == 1 else pair * noise_scale
        return _PairST.apply(blocks, pair, axis, 1.0 / temperature).reshape(x.shape)
    z = _noisy(blocks, noise_scale, generator, noise)
    if not hard:
        return (blocks * torch.softmax(z / temperature, dim=axis).to(x.dtype)).reshape(x.shape)
    if torch.is_grad_enabled() and x.requires_grad:
        return _HardST.apply(blocks, z, axis, 1.0 / temperature).reshape(x.shape)
    return (blocks * _max_mask(z, z.amax(axis, keepdim=True), axis)).reshape(x.shape)


def lwta_kl_uniform(x: Tensor, competitors: int, dim: int = -1) -> Tensor:
    """Mean over blocks of KL(softmax(block) || uniform(1/U)): the prior term of earlier LWTA work.

    Pushes blocks towards balanced competition; its weight is a config knob (default 0, as in DISCOVER).
    It regularises softmax(x), the sampling distribution of ``noise_scale=1`` only; with the default 0.1 the
    winner is drawn from softmax(x / 0.1), which this term does not see (not yet measured with kl_weight > 0).
    """
    blocks, axis = _blocks(x, competitors, dim)
    logq = torch.log_softmax(blocks.float(), dim=axis)
    kl = (logq.exp() * logq).sum(axis) + math.log(competitors)
    return kl.mean()


class LWTA(nn.Module):
    """Stochastic LWTA activation: one winner per block of ``competitors`` (U) units along ``dim``.

    With U competitors exactly 1/U of the outputs are non-zero (U=24 gives ~4%). Eval defaults to
    "argmax" so that a trained network's predictions and dissection are deterministic; use
    ``eval_mode="sample"`` (with ``noise_scale=1``) to reproduce DISCOVER's stochastic inference.

    Why ``noise_scale=0.1`` by default, not the classic 1 (winner ~ softmax(x)): the temperature never
    changes which unit wins a hard sample, so with s = 1 only the scale of the pre-activations sets how
    random the competition is, and after BatchNorm that scale is ~1, the same as the Gumbel noise's. The
    noise then picks many winners, more often the more competitors there are, while argmax eval uses the
    best unit. Measured (benchmarks/fmnist_accuracy.py --split val: a 10k validation split of the training
    set, 3 seeds, U=16): val accuracy 0.851 at s = 1, 0.877 at 0.5, 0.886 at 0.25, 0.891 at 0.1, 0.894 at 0,
    ReLU 0.885; annealing s from 1 to 0 (0.873), larger BatchNorm init (0.877), a 3x learning rate (0.856),
    the KL prior (0.851) and sampled or averaged inference (0.826, 0.844) did not close the gap. 0.1 keeps the
    competition stochastic (U=2: 0.892 vs 0.888 at s = 0; U=24: 0.890 vs 0.896). On the test set it stays within
    0.5 points of ReLU from U=2 to U=24 (BENCHMARKS.md; was -5 points at U=16). ``noise_scale`` is a plain
    setting (no parameter or buffer), so state dicts from before it load unchanged.

    Args:
        competitors: units per block (U).
        dim: competition axis; 1 for conv maps (N, C, H, W), -1 for tokens (N, L, D) and vectors (N, D).
        temperature: Gumbel-softmax temperature (DISCOVER uses 1.67).
        hard: straight-through hard sample during training (default) or the soft relaxation.
        eval_mode: "argmax" or "sample".
        noise_scale: scale s of the Gumbel noise: winners are drawn from softmax(x / s) in training and in
            "sample" eval; 0 = deterministic competition, 1 = DISCOVER's. See above for the default.
        impl: "auto" (the fused CPU kernel where it applies, ``fused.py``), "fused" or "reference".
    """

    def __init__(
        self,
        competitors: int = 2,
        dim: int = -1,
        temperature: float = 1.67,
        hard: bool = True,
        eval_mode: str = "argmax",
        noise_scale: float = 0.1,
        impl: str = "auto",
    ):
        super().__init__()
        try:  # values from a dict-typed config (model_kwargs) can arrive as strings: "2" -> 2
            competitors, temperature, noise_scale = int(competitors), float(temperature), float(noise_scale)
        except (TypeError, ValueError):
            raise ValueError(f"LWTA competitors must be an integer, temperature and noise_scale numbers, got "
                             f"competitors={competitors!r}, temperature={temperature!r}, "
                             f"noise_scale={noise_scale!r}") from None
        if competitors < 1:
            raise ValueError(f"LWTA competitors must be >= 1, got {competitors}")
        if temperature <= 0:
            raise ValueError(f"LWTA temperature must be > 0, got {temperature}")
        if noise_scale < 0:
            raise ValueError(f"LWTA noise_scale must be >= 0, got {noise_scale}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"LWTA eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        if impl not in IMPLS:
            raise ValueError(f"LWTA impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.competitors, self.dim, self.temperature = competitors, dim, temperature
        self.hard, self.eval_mode, self.noise_scale = hard, eval_mode, noise_scale

    def forward(self, x: Tensor) -> Tensor:
        return lwta(x, self.competitors, self.dim, self.temperature, self.training, self.hard, self.eval_mode,
                    noise_scale=self.noise_scale, impl=getattr(self, "impl", "auto"))

    def kl_uniform(self, x: Tensor) -> Tensor:
        return lwta_kl_uniform(x, self.competitors, self.dim)

    def extra_repr(self) -> str:
        return (
            f"competitors={self.competitors}, dim={self.dim}, temperature={self.temperature}, "
            f"hard={self.hard}, eval_mode={self.eval_mode!r}, noise_scale={self.noise_scale}"
            + (f", impl={self.impl!r}" if getattr(self, "impl", "auto") != "auto" else "")
        )


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "lwta": LWTA, "identity": nn.Identity, "silu": nn.SiLU}


def create_act(act: str | type | None, dim: int = -1, width: Optional[int] = None, **kwargs) -> nn.Module:
    """Build an activation by name ("relu", "gelu", "lwta", ...) so a backbone swaps it with one argument.

    ``dim`` (the competition axis) is supplied by the backbone, which knows whether it is a conv or a token
    layer; it is ignored by activations without one. ``width`` (the number of units along ``dim``), when
    given, is checked against ``competitors`` at build time rather than at the first forward pass.
    ``kwargs`` go to the activation (e.g. competitors).
    """
    if act is None:
        return nn.Identity()
    cls = act
    if isinstance(act, str):
        key = act.lower()
        if key not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        cls = ACTIVATIONS[key]
    if cls is LWTA:
        module = LWTA(dim=dim, **kwargs)
        if width is not None and width % module.competitors:
            raise ValueError(
                f"LWTA: layer width {width} is not divisible by competitors={module.competitors}; choose "
                f"competitors dividing {width} (e.g. {', '.join(str(d) for d in _divisors(width)[:6])})"
            )
        return module
    if kwargs:
        raise ValueError(f"activation {act!r} takes no arguments, got {sorted(kwargs)} (act_kwargs is for lwta)")
    return cls()


def lwta_modules(model: nn.Module) -> dict[str, LWTA]:
    """All LWTA layers of a model by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LWTA)}
