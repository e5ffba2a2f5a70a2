"""Record per-neuron activations of chosen layers over a probe set (torch only).

One pass over the probe loader records several layers at once through forward hooks that are always
removed. Spatial maps are pooled per image on the fly (conv: mean or max over space; tokens: CLS or mean),
so memory is O(images x neurons), never O(images x neurons x positions). A running top-k per neuron is kept
while streaming; spatial maps are recomputed later only for the few images a report needs.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

POOLINGS = ("mean", "max")
TOKEN_POOLINGS = ("cls", "mean")


class LayerNotFoundError(ValueError):
    pass


LOG_SOFTMAX = "log_softmax"


def expose_log_softmax(model: nn.Module) -> nn.Module:
    """Add the class log-probabilities as a dissectable layer named ``log_softmax`` (in place; returns model).

    Why: a logit means something only relative to the other logits of the same image, yet dissection
    compares one unit's values across images, so a class logit can rank another class's images above its
    own (RESULTS.md §3). A log-probability compares within the image. It runs in a forward hook whose result
    is recorded and discarded: the model's output, parameters and state dict are unchanged. A model that
    already has a ``log_softmax`` child is returned as is.
    """
    if LOG_SOFTMAX in dict(model.named_children()):
        return model
    head = nn.LogSoftmax(dim=1)
    model.add_module(LOG_SOFTMAX, head)

    def run_head(module: nn.Module, args, out) -> None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if logits.ndim != 2:
            raise ValueError(f"layer {LOG_SOFTMAX!r} needs [batch, classes] network outputs, got {tuple(logits.shape)}")
        head(logits)

    model.register_forward_hook(run_head)
    return model


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Map module paths to modules; an unknown path names the closest valid ones.

    ``log_softmax`` (the class log-probabilities) resolves only after :func:`expose_log_softmax`.
    """
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise ValueError("no layers given; pass module paths such as 'layer4' or 'fc'")
    names = [n for n, _ in model.named_modules() if n]
    out = {}
    for path in layers:
        try:
            out[path] = model.get_submodule(path)
        except AttributeError:
            close = difflib.get_close_matches(path, names, n=6, cutoff=0.5)
            top = [n for n in names if "." not in n]
            raise LayerNotFoundError(
                f"layer {path!r} not found in {type(model).__name__}; "
                + (f"'{LOG_SOFTMAX}' (class log-probabilities) is available in dissect.py only; "
                   if path == LOG_SOFTMAX else "")
                + (f"closest: {', '.join(close)}; " if close else "")
                + f"top-level modules: {', '.join(top)}"
            ) from None
    return out


def pool_output(out: Tensor, pooling: str = "mean", token_pooling: str = "cls") -> Tensor:
    """Summarise a layer output to one value per (image, neuron): [N, K]."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim == 4:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        return out.mean((2, 3)) if pooling == "mean" else out.amax((2, 3))
    if out.ndim == 3:
        if token_pooling not in TOKEN_POOLINGS:
            raise ValueError(f"token_pooling must be one of {TOKEN_POOLINGS}, got {token_pooling!r}")
        return out[:, 0] if token_pooling == "cls" else out.mean(1)
    if out.ndim == 2:
        return out
    raise ValueError(f"cannot pool a layer output of shape {tuple(out.shape)}; expected 2-D, 3-D or 4-D")


def _unit_activity(out: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per unit: positions where it is non-zero (won), images where it won anywhere, positions per image."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    nz = out != 0
    if out.ndim == 4:
        pos = nz.sum((2, 3))
        return pos.sum(0), (pos > 0).sum(0), out.shape[2] * out.shape[3]
    if out.ndim == 3:
        pos = nz.sum(1)
        return pos.sum(0), (pos > 0).sum(0), out.shape[1]
    return nz.sum(0), nz.sum(0), 1


@dataclass
class LayerRecord:
    """What one pass recorded for one layer.

    Attributes:
        pooled: [N, K] pooled activation per image and neuron (float32, CPU).
        top_values, top_indices: [top_k, K] the running top-k per neuron (descending).
        win_rate: [K] fraction of (image, position) pairs where the unit's output is non-zero; for LWTA
            layers, how often the unit wins its block.
        input_rate: [K] fraction of images where the unit is non-zero anywhere.
        spatial: whether the layer outputs spatial maps (N, C, H, W).
        image_ids: [N] probe index of each row of ``pooled``.
        win_count, input_count: [K] the float64 counts behind the two rates, and ``positions`` (per image):
            shards recorded apart (DDP) merge to exactly the rates of one recording.
    """

    name: str
    pooled: Tensor
    top_values: Tensor
    top_indices: Tensor
    win_rate: Tensor
    input_rate: Tensor
    spatial: bool
    image_ids: Optional[Tensor] = None
    win_count: Optional[Tensor] = None
    input_count: Optional[Tensor] = None
    positions: int = 1

    @property
    def num_units(self) -> int:
        return self.pooled.shape[1]

    @property
    def active(self) -> Tensor:
        """Units that won at least once on the probe set; the others are reported inactive, not labelled."""
        return self.win_rate > 0

    def summary(self) -> dict:
        act = self.active
        return {
            "layer": self.name,
            "units": self.num_units,
            "active_units": int(act.sum()),
            "active_fraction": float(act.float().mean()),
            "mean_win_rate_active": float(self.win_rate[act].mean()) if act.any() else 0.0,
            "mean_input_rate_active": float(self.input_rate[act].mean()) if act.any() else 0.0,
        }


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model (and every submodule) in eval mode, restoring each module's own flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def capture(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Forward hooks storing each layer's latest output in a dict; always removed on exit."""
    modules = resolve_layers(model, layers)
    outputs: dict[str, Tensor] = {}
    handles = []
    try:
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(lambda _m, _i, o, name=name: outputs.__setitem__(name, o)))
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _batch_inputs(batch) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def record_activations(
    model: nn.Module,
    layers: Sequence[str],
    loader: Iterable,
    pooling: str = "mean",
    token_pooling: str = "cls",
    top_k: int = 100,
    device: Optional[torch.device] = None,
    progress: bool = False,
) -> dict[str, LayerRecord]:
    """Stream a loader of ``(inputs, image_index)`` batches through the model and record the layers.

    The second element of each batch must be the image's index in the probe set (``ProbeSet.network_dataset``
    yields exactly that), so that sharded or shuffled loaders still map rows to images.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = device or next(model.parameters()).device
    pooled: dict[str, list[Tensor]] = {n: [] for n in layers}
    ids: list[Tensor] = []
    top_v: dict[str, Tensor] = {}
    top_i: dict[str, Tensor] = {}
    wins: dict[str, Tensor] = {}
    inputs_won: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    spatial: dict[str, bool] = {}
    n_seen = 0
    iterator = loader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc="activations", leave=False)
    with torch.no_grad(), eval_mode(model), capture(model, layers) as outputs:
        for batch in iterator:
            x, idx = _batch_inputs(batch)
            if idx is None:
                idx = torch.arange(n_seen, n_seen + x.shape[0])
            model(x.to(device, non_blocking=True))
            idx = idx.cpu().long()
            ids.append(idx)
            for name in layers:
                out = outputs[name]
                if isinstance(out, (tuple, list)):
                    out = out[0]
                p = pool_output(out, pooling, token_pooling).float().cpu()
                pooled[name].append(p)
                won, imgs, npos = _unit_activity(out)
                wins[name] = wins.get(name, 0) + won.cpu().double()
                inputs_won[name] = inputs_won.get(name, 0) + imgs.cpu().double()
                positions[name] = npos
                spatial[name] = out.ndim == 4
                # running top-k: merge this batch's candidates with the current best
                cand_v = p if name not in top_v else torch.cat([top_v[name], p])
                cand_i = idx[:, None].expand_as(p) if name not in top_i else torch.cat(
                    [top_i[name], idx[:, None].expand_as(p)])
                top_v[name], top_i[name] = top_k_by_value(cand_v, cand_i, top_k)
            n_seen += x.shape[0]
            outputs.clear()
    if n_seen == 0:
        raise ValueError("the probe loader yielded no images")
    image_ids = torch.cat(ids)
    records = {}
    for name in layers:
        mat = torch.cat(pooled[name])
        records[name] = LayerRecord(
            name=name,
            pooled=mat,
            top_values=top_v[name],
            top_indices=top_i[name],
            win_rate=(wins[name] / (n_seen * positions[name])).float(),
            input_rate=(inputs_won[name] / n_seen).float(),
            spatial=spatial[name],
            image_ids=image_ids,
            win_count=wins[name],
            input_count=inputs_won[name],
            positions=positions[name],
        )
    return records


def top_k_by_value(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per column of ``values`` [N, K], the ``k`` largest values and their image ids ([N, K] or [N]).

    Equal values are ordered by image id (smallest first), so the top images do not depend on the batch
    order or on how the probe set was sharded (``torch.topk`` leaves the order of ties unspecified).
    """
    if ids.ndim == 1:
        ids = ids[:, None].expand_as(values)
    k = min(k, values.shape[0])
    by_id = ids.argsort(dim=0, stable=True)
    values, ids = values.gather(0, by_id), ids.gather(0, by_id)
    v, order = values.sort(dim=0, descending=True, stable=True)
    return v[:k], ids.gather(0, order[:k])


def order_by_image(record: LayerRecord, num_images: int) -> Tensor:
    """The pooled matrix with row i = probe image i (loaders may be sharded or shuffled)."""
    if record.image_ids is None:
        return record.pooled
    out = torch.full((num_images, record.num_units), float("nan"))
    out[record.image_ids] = record.pooled
    if torch.isnan(out).any():
        missing = int(torch.isnan(out[:, 0]).sum())
        raise ValueError(f"{missing} of {num_images} probe images were not recorded for layer {record.name!r}")
    return out


def spatial_maps(
    model: nn.Module,
    layer: str,
    dataset: Dataset,
    indices: Sequence[int],
    device: Optional[torch.device] = None,
    batch_size: int = 64,
) -> Tensor:
    """Recompute a layer's full output for a few probe images only: [len(indices), K, H, W] (or [.., K])."""
    device = device or next(model.parameters()).device
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False)
    maps = []
    with torch.no_grad(), eval_mode(model), capture(model, [layer]) as outputs:
        for batch in loader:
            x, _ = _batch_inputs(batch)
            model(x.to(device))
            out = outputs[layer]
            maps.append((out[0] if isinstance(out, (tuple, list)) else out).float().cpu())
    return torch.cat(maps) if maps else torch.empty(0)


def merge_records(shards: Sequence[LayerRecord], top_k: int) -> LayerRecord:
    """Merge recordings of one layer made on disjoint shards of the probe set (e.g. one per DDP rank).

    Rows are put in image order, the win and input counts are summed and divided once, and the top-k is
    recomputed on the merged matrix with the same tie rule as :func:`record_activations`: the result equals
    a single recording of the whole probe set. The shards' own ``top_values``/``top_indices`` are not used.
    """
    if not shards:
        raise ValueError("merge_records needs at least one shard")
    first = shards[0]
    pooled = torch.cat([s.pooled for s in shards])
    ids = torch.cat([s.image_ids if s.image_ids is not None else torch.full((s.pooled.shape[0],), -1)
                     for s in shards]).long()
    if (ids < 0).any():
        raise ValueError("merge_records needs the image_ids of every shard (record with an index loader)")
    order = ids.argsort()
    pooled, ids = pooled[order], ids[order]
    n = pooled.shape[0]
    win = sum(_counts(s, "win") for s in shards)
    inp = sum(_counts(s, "input") for s in shards)
    v, top_ids = top_k_by_value(pooled, ids, top_k)
    return LayerRecord(first.name, pooled, v, top_ids, (win / (n * first.positions)).float(),
                       (inp / n).float(), first.spatial, ids, win, inp, first.positions)


def _counts(record: LayerRecord, kind: str) -> Tensor:
    """The float64 counts behind a rate (recomputed from the rate for records made without them)."""
    count = record.win_count if kind == "win" else record.input_count
    if count is not None:
        return count.double()
    n = record.pooled.shape[0]
    return (record.win_rate.double() * n * record.positions if kind == "win" else record.input_rate.double() * n)
