"""Neuron-concept similarity functions (CLIP-Dissect and relatives).

Every function here is pure: ``activations`` ``[N images, K neurons]`` and ``image_concept_sim``
``[N images, M concepts]`` (P, the CLIP image-text cosine similarities) in, a score matrix ``[K, M]``
out, on the inputs' device. Higher scores mean a better description; a neuron's label is the argmax over
its row. No I/O, no progress bars, no device choice: the caller moves tensors where it wants the work
done.

P is a dense tensor, or an :class:`~lwta_vision.dissect.clip_dissect.image_concept.EmbeddingProduct` of
the image and text embeddings, which is never built: each function asks for the rows or columns it needs.

Which images are a neuron's top images is decided by :mod:`lwta_vision.dissect.ranking`, never by the order
of ties in ``torch.topk``: an LWTA unit is exactly 0 wherever it lost, and an arbitrary pick among those zeros
used to decide labels.

``soft_wpmi`` (the CLIP-Dissect default) only ever needs p(t|x) for images that are in some neuron's
top-k, so it computes those softmax rows a few at a time and accumulates the per-neuron sums with bounded
memory: peak extra memory is O(chunk_size * M + K * M) instead of the O(N * M + K * top_k * M) of the
direct formula (kept as ``soft_wpmi_reference`` for tests and benchmarks). The blocks are small enough to
stay in the CPU's cache, which is where its speed comes from (``benchmarks/soft_wpmi_scale.py``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from lwta_vision.dissect.clip_dissect.image_concept import EmbeddingProduct, ImageConcept, as_dense, columns_of, rows_of
from lwta_vision.dissect.ranking import TopMembership, top_membership

__all__ = [
    "SIMILARITIES",
    "cos_similarity",
    "cos_similarity_cubed",
    "get_similarity",
    "rank_reorder",
    "soft_wpmi",
    "soft_wpmi_reference",
    "wpmi",
]

SimilarityFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------------
# validation and shared helpers
# --------------------------------------------------------------------------------------------------
def _check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN/inf. One min/max reduction (NaN propagates): no N x M mask on success."""
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad_rows = (~torch.isfinite(t)).any(dim=1).nonzero().flatten()
    raise ValueError(
        f"{name} contains non-finite values (NaN or inf) in {bad_rows.numel()} row(s), first row "
        f"{int(bad_rows[0])}; clean or recompute it before scoring"
    )


def _validate(activations: torch.Tensor, image_concept_sim: ImageConcept) -> tuple[torch.Tensor, ImageConcept]:
    """Check shapes, dtypes, devices and finiteness; return (activations as float, image_concept_sim)."""
    lazy = isinstance(image_concept_sim, EmbeddingProduct)
    for name, t in (("activations", activations), ("image_concept_sim", image_concept_sim)):
        if not isinstance(t, torch.Tensor) and not (lazy and name == "image_concept_sim"):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if activations.ndim != 2:
        raise ValueError(
            f"activations must be 2-D [N images, K neurons], got shape {tuple(activations.shape)}; "
            "summarise conv/token outputs per neuron first"
        )
    if len(image_concept_sim.shape) != 2:
        raise ValueError(
            f"image_concept_sim must be 2-D [N images, M concepts], got shape {tuple(image_concept_sim.shape)}"
        )
    if activations.shape[0] != image_concept_sim.shape[0]:
        raise ValueError(
            f"activations {tuple(activations.shape)} and image_concept_sim {tuple(image_concept_sim.shape)} "
            f"disagree on the number of images N ({activations.shape[0]} vs {image_concept_sim.shape[0]}); "
            "both need one row per probe image, in the same order"
        )
    if 0 in activations.shape or 0 in image_concept_sim.shape:
        raise ValueError(
            f"empty input: activations {tuple(activations.shape)}, image_concept_sim "
            f"{tuple(image_concept_sim.shape)}; need at least one image, neuron and concept"
        )
    if activations.device != image_concept_sim.device:
        raise ValueError(
            f"activations is on {activations.device} but image_concept_sim is on {image_concept_sim.device}; "
            "move both to the same device"
        )
    if not image_concept_sim.dtype.is_floating_point:
        raise TypeError(f"image_concept_sim must be a floating-point tensor, got {image_concept_sim.dtype}")
    if not activations.is_floating_point():
        activations = activations.float()
    _check_finite("activations", activations)
    if lazy:  # finite embeddings give finite products: no N x M check
        _check_finite("image embeddings", image_concept_sim.image)
        _check_finite("text embeddings", image_concept_sim.text)
    else:
        _check_finite("image_concept_sim", image_concept_sim)
    return activations, image_concept_sim


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _membership(activations: torch.Tensor, top_k: int, p_start=None, p_end=None, dtype=torch.float64
                ) -> TopMembership:
    """Each neuron's top images by :mod:`lwta_vision.dissect.ranking`'s rule (independent of image order)."""
    return top_membership(activations, _check_positive_int("top_k", top_k), p_start, p_end, dtype)


def _top_sets(activations: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    """Per neuron, its top images (the ranking rule, the whole tie group at the cut), most active first."""
    m = _membership(activations, top_k)
    out = []
    for neuron in range(activations.shape[1]):
        images = m.images_of(neuron)
        out.append(images[activations[images, neuron].argsort(descending=True, stable=True)])
    return out


def _pmi_from_log_likelihood(log_p_t_given_k: torch.Tensor, lam: float) -> torch.Tensor:
    """score = log p(t|k) - lam * log p(t), with log p(t) = logsumexp_k log p(t|k) - log K."""
    num_neurons = log_p_t_given_k.shape[0]
    log_p_t = torch.logsumexp(log_p_t_given_k, dim=0, keepdim=True) - math.log(num_neurons)
    return log_p_t_given_k - lam * log_p_t


def _softmax_rows_(x: torch.Tensor, a: float) -> torch.Tensor:
    """In-place row softmax of a * x (no extra [rows, M] buffers)."""
    x.mul_(a)
    x.sub_(x.amax(dim=1, keepdim=True))
    x.exp_()
    x.div_(x.sum(dim=1, keepdim=True))
    return x


_ROW_ELEMENTS = 1 << 21  # entries of the softmax rows computed at once (16 MiB in float64)
_BLOCK_ELEMENTS = 1 << 19  # entries of one block of terms (4 MiB in float64): small enough to stay in cache


def _chunked_log_likelihood(
    image_concept_sim: ImageConcept,
    member: TopMembership,
    num_neurons: int,
    soft: bool,
    a: float,
    min_prob: float,
    chunk_size: Optional[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """log p(t|k) [K, M] from the softmax rows of the union of top images, a few rows at a time.

    Each (image x, neuron n) pair of ``member`` contributes mass * log(c + w p(t|x)) with c = 1 - w + min_prob,
    i.e. log(1 + w (p(t|x) - 1) + min_prob) without the cancellation of 1 - w (p - 1) (or, when not ``soft``,
    mass * log(p(t|x) + min_prob)), to row n; each row is then multiplied by the neuron's ``scale`` (top_k
    terms for every neuron, see :mod:`lwta_vision.dissect.ranking`). Pairs are sorted by image so every
    softmax row is computed once. Rows are computed ``chunk_size`` at a time (default: ``_ROW_ELEMENTS``
    entries' worth) and pairs handled in blocks of ``_BLOCK_ELEMENTS`` entries, so each block's passes
    (gather, multiply-add, log, scale, scatter-add) run in cache rather than through memory.
    """
    num_concepts = image_concept_sim.shape[1]
    device = member.image.device
    block = max(1, _BLOCK_ELEMENTS // num_concepts)
    rows_at_once = max(1, _ROW_ELEMENTS // num_concepts) if chunk_size is None else chunk_size
    union, position = torch.unique(member.image, sorted=True, return_inverse=True)
    order = torch.argsort(position, stable=True)
    position, flat_neuron = position[order], member.unit[order]
    flat_mass = member.mass[order].to(dtype).unsqueeze(1)
    weighted = not bool((flat_mass == 1).all())
    flat_weight = flat_floor = None
    if soft:
        w = member.weight[order].to(dtype)
        flat_weight, flat_floor = w.unsqueeze(1), (1.0 - w + min_prob).unsqueeze(1)

    out = torch.zeros(num_neurons, num_concepts, dtype=dtype, device=device)
    num_union = union.numel()
    starts = list(range(0, num_union, rows_at_once))
    edges = torch.searchsorted(
        position, torch.tensor(starts + [num_union], device=device, dtype=position.dtype)
    ).tolist()
    for i, start in enumerate(starts):
        rows = union[start : start + rows_at_once]
        probs = _softmax_rows_(rows_of(image_concept_sim, rows).to(dtype), a)
        lo, hi = edges[i], edges[i + 1]
        for b in range(lo, hi, block):
            e = min(hi, b + block)
            terms = probs.index_select(0, position[b:e] - start)
            if flat_weight is None:
                terms.add_(min_prob)
            else:
                torch.addcmul(flat_floor[b:e], terms, flat_weight[b:e], out=terms)
            terms.log_()
            if weighted:
                terms.mul_(flat_mass[b:e])
            out.index_add_(0, flat_neuron[b:e], terms)
            del terms
        del probs
    return out.mul_(member.scale.to(dtype).unsqueeze(1))


# --------------------------------------------------------------------------------------------------
# WPMI family
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def soft_wpmi(
    activations: torch.Tensor,
    image_concept_sim: ImageConcept,
    top_k: int = 100,
    a: float = 10.0,
    lam: float = 1.0,
    p_start: float = 0.998,
    p_end: float = 0.97,
    min_prob: float = 1e-7,
    chunk_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    return_log_likelihood: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Soft weighted pointwise mutual information (CLIP-Dissect's default), memory-bounded.

    p(t|x) = softmax_t(a * P[x, t]). Neuron k's top_k images (by activation, descending; top_k is clipped
    to N and the clipped value is used in the weights) get soft membership w_r = p_start -
    (r / top_k)(p_start - p_end) at 0-based rank r, and

        log p(t|k) = sum_r log(1 + w_r (p(t|x_r) - 1) + min_prob)

    The top images follow :mod:`lwta_vision.dissect.ranking`, so the scores do not depend on the order of
    the images: images where a neuron is exactly 0 (where an LWTA unit lost) are left out and the sum is
    rescaled to top_k terms; tied images share the weights of the ranks they span.
        log p(t)   = logsumexp_k log p(t|k) - log K          (over the K neurons given)
        score      = log p(t|k) - lam * log p(t)

    Only the softmax rows of images in some neuron's top-k are computed, ``chunk_size`` rows at a time,
    and pairs (image, neuron) are processed in cache-sized blocks, so no N x M softmax and no K x top_k x M
    tensor is ever materialised (and with an ``EmbeddingProduct``, no N x M matrix at all). With K = 1 and lam = 1 every score is 0.

    Args:
        activations: [N images, K neurons] per-neuron activation summaries.
        image_concept_sim: [N images, M concepts] image-text cosine similarities P: a tensor, or an
            :class:`EmbeddingProduct`, of which only the rows of top-k images are computed.
        top_k: images per neuron treated as (softly) showing the neuron's concept.
        a: softmax temperature factor applied to P.
        lam: weight of the concept prior log p(t); 1 = PMI, 0 = plain likelihood.
        p_start: membership weight of the most-activating image.
        p_end: weight the linear ramp reaches at rank top_k (the last image gets slightly more).
        min_prob: floor inside the log, keeps scores finite.
        chunk_size: softmax rows held at once (memory ~ chunk_size * M); default: 2**21 // M rows (the log
            terms then go in blocks of 2**19 // M rows), the fastest of six sizes measured
            (BENCHMARKS.md, soft-WPMI at ImageNet scale).
        dtype: computation dtype; float64 by default because scores are sums of ~top_k logs (|score|
            in the hundreds) whose differences between concepts can be small.
        return_log_likelihood: also return log p(t|k) [K, M], from which the labeling derives the key
            that decides ties between saturated scores (see :mod:`lwta_vision.dissect.clip_dissect.labeling`).

    Returns:
        [K, M] scores in ``dtype``; ``argmax(dim=1)`` gives each neuron's label. With
        ``return_log_likelihood``, the pair ``(scores, log p(t|k))``.
    """
    activations, image_concept_sim = _validate(activations, image_concept_sim)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    if min_prob < 0:
        raise ValueError(f"min_prob must be >= 0, got {min_prob}")
    member = _membership(activations, top_k, p_start, p_end, dtype)
    log_p_t_given_k = _chunked_log_likelihood(image_concept_sim, member, activations.shape[1], True, a, min_prob,
                                              chunk_size, dtype)
    scores = _pmi_from_log_likelihood(log_p_t_given_k, lam)
    return (scores, log_p_t_given_k) if return_log_likelihood else scores


@torch.no_grad()
def soft_wpmi_reference(
    activations: torch.Tensor,
    image_concept_sim: ImageConcept,
    top_k: int = 100,
    a: float = 10.0,
    lam: float = 1.0,
    p_start: float = 0.998,
    p_end: float = 0.97,
    min_prob: float = 1e-7,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The direct soft-WPMI formula: full N x M softmax, one neuron at a time. For tests and benchmarks.

    Same arguments and result as :func:`soft_wpmi` (to floating-point rounding), with memory O(N * M). Its top
    images come from a full sort and explicit tie groups, written apart from :mod:`lwta_vision.dissect.ranking`,
    so the two check each other.
    """
    activations, image_concept_sim = _validate(activations, image_concept_sim)
    if min_prob < 0:
        raise ValueError(f"min_prob must be >= 0, got {min_prob}")
    if not (0.0 <= p_end <= 1.0 and 0.0 <= p_start <= 1.0):
        raise ValueError(f"p_start and p_end must lie in [0, 1], got p_start={p_start}, p_end={p_end}")
    probs = torch.softmax(a * as_dense(image_concept_sim).to(dtype), dim=1)  # [N, M]
    n = activations.shape[0]
    k = min(_check_positive_int("top_k", top_k), n)
    rows = []
    for column in activations.T.tolist():
        groups: dict[float, list[int]] = {}
        for image, value in enumerate(column):
            groups.setdefault(value, []).append(image)
        if len(groups.get(0.0, [])) >= 2 and len(groups) > 1:  # where the unit lost: never a top image
            del groups[0.0]
        total, acc, position = 0.0, torch.zeros(probs.shape[1], dtype=dtype), 0
        for value in sorted(groups, reverse=True):
            members = groups[value]
            if position >= k:
                break
            end = min(position + len(members), k)
            w = p_start - ((position + end - 1) / 2 / k) * (p_start - p_end)
            mass = (end - position) / len(members)
            acc += mass * torch.log(1 + w * (probs[members] - 1) + min_prob).sum(0)
            total += end - position
            position += len(members)
        rows.append(acc * (k / total))
    return _pmi_from_log_likelihood(torch.stack(rows), lam)


@torch.no_grad()
def wpmi(
    activations: torch.Tensor,
    image_concept_sim: ImageConcept,
    top_k: int = 28,
    a: float = 2.0,
    lam: float = 0.6,
    min_prob: float = 1e-7,
    chunk_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    return_log_likelihood: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Weighted pointwise mutual information with hard top-k membership (CLIP-Dissect's ``wpmi``).

    p(t|x) = softmax_t(a * P[x, t]); with x_1..x_top_k neuron k's most-activating images,

        log p(t|k) = sum_{r < top_k} log(p(t|x_r) + min_prob)
        log p(t)   = logsumexp_k log p(t|k) - log K
        score      = log p(t|k) - lam * log p(t)

    i.e. soft-WPMI with every membership weight 1. Computed with the same memory-bounded chunking as
    :func:`soft_wpmi` (see there for ``chunk_size``, ``dtype`` and ``return_log_likelihood``); top_k is
    clipped to N.
    """
    activations, image_concept_sim = _validate(activations, image_concept_sim)
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    if min_prob < 0:
        raise ValueError(f"min_prob must be >= 0, got {min_prob}")
    member = _membership(activations, top_k, dtype=dtype)
    log_p_t_given_k = _chunked_log_likelihood(image_concept_sim, member, activations.shape[1], False, a, min_prob,
                                              chunk_size, dtype)
    scores = _pmi_from_log_likelihood(log_p_t_given_k, lam)
    return (scores, log_p_t_given_k) if return_log_likelihood else scores


# --------------------------------------------------------------------------------------------------
# cosine family
# --------------------------------------------------------------------------------------------------
def _compute_dtype(*tensors) -> torch.dtype:
    dtype = torch.promote_types(tensors[0].dtype, tensors[1].dtype)
    return torch.promote_types(dtype, torch.float32)


def _normalise_columns(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=0, keepdim=True).clamp_min(eps)


def _column_block(p: ImageConcept, start: int, size: int) -> torch.Tensor:
    """P[:, start:start + size], computed for a lazy P."""
    stop = min(start + size, p.shape[1])
    if isinstance(p, EmbeddingProduct):
        return columns_of(p, torch.arange(start, stop, device=p.device))
    return p[:, start:stop]


def _centre_cube(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=0, keepdim=True)).pow(3)


@torch.no_grad()
def cos_similarity(
    activations: torch.Tensor,
    image_concept_sim: ImageConcept,
    eps: float = 1e-12,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Cosine similarity, over images, between each neuron's column of A and each concept's column of P.

    ``eps`` floors column norms (a constant column scores 0 instead of NaN); P is processed
    ``chunk_size`` concept columns at a time.
    """
    activations, image_concept_sim = _validate(activations, image_concept_sim)
    _check_positive_int("chunk_size", chunk_size)
    dtype = _compute_dtype(activations, image_concept_sim)
    neurons = _normalise_columns(activations.to(dtype), eps).T  # [K, N]
    out = torch.empty(activations.shape[1], image_concept_sim.shape[1], dtype=dtype, device=activations.device)
    for start in range(0, image_concept_sim.shape[1], chunk_size):
        block = _column_block(image_concept_sim, start, chunk_size).to(dtype)
        out[:, start : start + block.shape[1]] = neurons @ _normalise_columns(block, eps)
    return out


@torch.no_grad()
def cos_similarity_cubed(
    activations: torch.Tensor,
    image_concept_sim: ImageConcept,
    eps: float = 1e-12,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """CLIP-Dissect's ``cos_similarity_cubed``: centre each column (over images), cube, then cosine.

    Cubing emphasises each column's extreme images, so the score is driven by where neuron and concept
    are both far from their means. Columns are normalised with their L2 norm floored at ``eps`` (the
    reference code floors at 1e-3, which rescales low-variance concepts; we keep a true cosine).
    """
    activations, image_concept_sim = _validate(activations, image_concept_sim)
    _check_positive_int("chunk_size", chunk_size)
    dtype = _compute_dtype(activations, image_concept_sim)
    neurons = _normalise_columns(_centre_cube(activations.to(dtype)), eps).T
    out = torch.empty(activations.shape[1], image_concept_sim.shape[1], dtype=dtype, device=activations.device)
    for start in range(0, image_concept_sim.shape[1], chunk_size):
        block = _centre_cube(_column_block(image_concept_sim, start, chunk_size).to(dtype))
        out[:, start : start + block.shape[1]] = neurons @ _normalise_columns(block, eps)
    return out


# --------------------------------------------------------------------------------------------------
# rank reorder
# --------------------------------------------------------------------------------------------------
def _mean_abs_pow_diff(v: torch.Tensor, p: float, rows: int = 1024) -> torch.Tensor:
    """mean over (i, j) of |v_i - v_j|^p, a block of rows at a time (a tie cut by the top-k can bring many)."""
    total = torch.zeros((), dtype=v.dtype, device=v.device)
    for start in range(0, v.shape[0], rows):
        total += (v[start:start + rows, None] - v[None, :]).abs().pow(p).sum()
    return total / (v.shape[0] ** 2)


@torch.no_grad()
def rank_reorder(
    activations: torch.Tensor,
    image_concept_sim: ImageConcept,
    top_k: Optional[int] = None,
    top_fraction: float = 0.05,
    p: float = 3.0,
    scale_p: float = 0.5,
    eps: float = 1e-6,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """How well a concept's ranking of a neuron's top images reproduces the neuron's own ranking.

    For neuron k take its n top images x_1..x_n with activations v_1 >= ... >= v_n (by
    :mod:`lwta_vision.dissect.ranking`'s rule: no exact zeros when two or more images are 0 and some
    image is not, and every image tied with the n-th; a unit tied on all of them scores 0 everywhere). Concept t ranks the
    same images by P[x, t] (descending); if it puts image i at position rho_t(i), the activation it
    "predicts" for image i is v_{rho_t(i)}. The error is

        err(k, t) = mean_i |v_i - v_{rho_t(i)}|^p / E_pi[mean_i |v_i - v_{pi(i)}|^p]

    normalised by its expectation under a uniformly random ordering pi (= mean_{i,j} |v_i - v_j|^p,
    computed exactly, so the score is deterministic and invariant to rescaling the activations). As in
    CLIP-Dissect's ``rank_reorder``, it is divided by (mean_i P[x_i, t])^scale_p so concepts that are also
    strongly present in the top images are preferred (the mean is floored at ``eps``; concepts whose mean
    similarity is <= 0 get a very low score). score = -err / mean^scale_p; a concept whose ranking equals
    the neuron's gets the best possible score, 0.

    Args:
        activations: [N images, K neurons].
        image_concept_sim: [N images, M concepts].
        top_k: images per neuron; ``None`` uses ``max(1, int(top_fraction * N))`` (reference: 5%).
        top_fraction: fraction of N used when ``top_k`` is None.
        p: exponent of the rank-reorder error.
        scale_p: exponent of the mean-similarity divisor; 0 disables it.
        eps: floor of the mean similarity and of the random-order normaliser.
        chunk_size: concepts processed at once per neuron (memory ~ n * chunk_size).

    Returns:
        [K, M] scores (<= 0, higher is better).
    """
    activations, image_concept_sim = _validate(activations, image_concept_sim)
    _check_positive_int("chunk_size", chunk_size)
    n_images = activations.shape[0]
    if top_k is None:
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        top_k = max(1, int(top_fraction * n_images))
    dtype = _compute_dtype(activations, image_concept_sim)
    tops = _top_sets(activations, top_k)  # per neuron, most active first
    num_concepts = image_concept_sim.shape[1]
    out = torch.empty(activations.shape[1], num_concepts, dtype=dtype, device=activations.device)
    for neuron in range(activations.shape[1]):
        images = tops[neuron]
        target = activations[images, neuron].to(dtype)  # descending
        if bool(target[0] == target[-1]):  # every top image ties (a constant unit): every ordering is exact
            out[neuron] = 0.0
            continue
        random_order_err = _mean_abs_pow_diff(target, p).clamp_min(eps)
        rows = rows_of(image_concept_sim, images)  # [n, M]
        for start in range(0, num_concepts, chunk_size):
            sims = rows[:, start : start + chunk_size].to(dtype)  # [n, c]
            order = torch.argsort(sims, dim=0, descending=True, stable=True)
            rank = torch.argsort(order, dim=0)  # rank[i, t]: position of image i in concept t's order
            predicted = target[rank]
            err = (target[:, None] - predicted).abs().pow(p).mean(dim=0) / random_order_err
            presence = sims.mean(dim=0).clamp_min(eps).pow(scale_p)
            out[neuron, start : start + sims.shape[1]] = -err / presence
    return out


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
SIMILARITIES: dict[str, SimilarityFn] = {
    "soft_wpmi": soft_wpmi,
    "wpmi": wpmi,
    "cos_similarity": cos_similarity,
    "cos_similarity_cubed": cos_similarity_cubed,
    "rank_reorder": rank_reorder,
}


def get_similarity(name: Union[str, SimilarityFn]) -> SimilarityFn:
    """Resolve a similarity function by registry name (a callable is returned unchanged)."""
    if callable(name):
        return name
    try:
        return SIMILARITIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown similarity {name!r}; available: {', '.join(SIMILARITIES)}"
        ) from None
