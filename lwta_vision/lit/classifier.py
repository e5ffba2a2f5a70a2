"""LightningModule for image classification with LWTA (or baseline) backbones."""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lwta_vision.dissect.evaluate.planted import PLANT_MARGIN, PlantedUnit, assign_units, planted_loss
from lwta_vision.layers import collect_lwta_stats, describe_implementation, implementation, lwta_modules, win_entropy
from lwta_vision.models import backbone_kwargs, create_model


class NonFiniteLossError(RuntimeError):
    pass


class BatchWeightedMean(Metric):
    """Mean of per-batch values weighted by batch size, kept as two sums that DDP ranks add up.

    Lightning's own ``self.log(value, sync_dist=True)`` mean divides by an integer average of the ranks' image
    counts (65 images on 2 ranks: 65 / 2 -> 32), so it is wrong whenever ranks hold unequal numbers of
    images, as they do here (eval splits are sharded without padding). torchmetrics' ``MeanMetric`` drops its
    weights with ``nan_strategy="disable"`` and silently removes NaNs otherwise; a NaN loss must show.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value, batch_size: int) -> None:
        self.total += torch.as_tensor(value, dtype=self.total.dtype, device=self.total.device).detach() * batch_size
        self.weight += batch_size

    def compute(self) -> Tensor:
        return self.total / self.weight


class WinEntropy(Metric):
    """Win-rate entropy of one LWTA layer over an epoch (``lwta_vision.layers.win_entropy``: 1 = the units of
    a block share the wins evenly, 0 = one unit always wins). Keeps per-unit win counts, summed over DDP ranks,
    so it is exact for the whole split rather than a mean of noisy per-batch values."""

    full_state_update = False

    def __init__(self, competitors: int):
        super().__init__()
        self.competitors = competitors
        self.add_state("wins", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, wins: Tensor) -> None:
        wins = wins.to(self.wins.device, torch.float64)
        self.wins = wins.clone() if self.wins.numel() == 0 else self.wins + wins  # width known at the first batch

    def compute(self) -> Tensor:
        return torch.tensor(win_entropy(self.wins, self.competitors))


class LitClassifier(L.LightningModule):
    """Cross-entropy classifier around a registry backbone.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_top5``, ``val/sparsity`` (mean
    fraction of non-zero LWTA outputs; 1/U when competition is hard), ``val/sparsity/<layer>`` and
    ``val/win_entropy/<layer>`` (how evenly a block's units share the wins over the split: 1 = evenly, 0 = one
    unit always wins, i.e. dead competitors that the active fraction cannot show); the same under ``test/``,
    and ``train/sparsity``, ``train/win_entropy`` (layer means, one batch) at logging steps.

    Args:
        model: registry name (see ``lwta_vision.models.list_models()``).
        model_kwargs: backbone arguments, e.g. ``{"stem": "cifar"}``.
        act, act_kwargs: the backbone's activation, e.g. ``"lwta"`` and ``{"competitors": 2}`` (merged into
            ``model_kwargs``; separate so that an overlay such as ``configs/act/lwta_u2.yaml`` swaps only them).
        num_classes, in_channels, class_names: linked from the datamodule by the CLI.
        optimizer, lr_scheduler: callables from the config (``class_path`` + ``init_args``). The shipped configs
            set a schedule's length as ``${trainer.max_epochs}``, resolved after every override (train.py parses
            in omegaconf+ mode). A resumed run keeps the length in its checkpoint; a warning says when a
            schedule's length differs from ``trainer.max_epochs``.
        label_smoothing: cross-entropy label smoothing.
        kl_weight: weight of the KL(q || uniform) LWTA regulariser (0 = off, as in DISCOVER).
        channels_last: keep conv weights and 4-D input batches in ``torch.channels_last`` memory format
            (NHWC: faster convolutions with bf16/fp16 on tensor-core GPUs and on recent CPUs). Outputs are the
            same as with the default layout; checkpoints load into either.
        compile: compile the backbone with ``torch.compile`` (in place, ``nn.Module.compile``: ``state_dict`` keys,
            checkpoints and the layers that hooks and dissection see stay the same). LWTA layers enter the graph
            as one custom op (``lwta_vision.layers.fused``). On a CPU the eager network can be the faster one
            (BENCHMARKS.md): measure before switching it on.
        compile_kwargs: arguments of ``torch.compile``, e.g. ``{"mode": "max-autotune"}`` or ``{"backend":
            "aot_eager"}``.
        planted: plant concept detectors: ``{layer: [concept, ...]}`` (module paths of the backbone, concept
            names of the datamodule, or ``[all]``). Those units get an auxiliary loss tying their output to
            the concept's mask (``lwta_vision.dissect.evaluate.planted``), so dissection has ground truth on hidden
            layers; needs a datamodule with concept masks (``ConceptDataModule(concept_masks=true)``). The
            units chosen are stored in checkpoints as ``planted_units``.
        planted_by: ``{category or concept: presence}`` ties those planted units to the concept's presence in
            the image (the map's maximum) instead of its mask; default: every unit by its mask.
        planted_weight: weight of that loss (logged as ``train/planted_loss``).
        planted_margin: the output a planted unit is pushed to exceed where its concept is.
    """

    def __init__(
        self,
        model: str = "convnet_small",
        model_kwargs: Optional[dict] = None,
        act: Optional[str] = None,
        act_kwargs: Optional[dict] = None,
        num_classes: int = 10,
        in_channels: int = 3,
        class_names: Optional[list[str]] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        label_smoothing: float = 0.0,
        kl_weight: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: Optional[dict] = None,
        planted: Optional[dict[str, list[str]]] = None,
        planted_by: Optional[dict[str, str]] = None,
        planted_weight: float = 1.0,
        planted_margin: float = PLANT_MARGIN,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = create_model(model, num_classes=num_classes, in_channels=in_channels,
                                  **backbone_kwargs(model_kwargs, act, act_kwargs))
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # 4-D parameters (conv weights); others unchanged
        if compile_kwargs and not compile:
            raise ValueError("compile_kwargs are set but compile is false; set model.init_args.compile: true")
        if compile:
            if lwta_modules(self.model):  # build the fused kernel now: a first build inside tracing breaks graphs
                from lwta_vision.layers import fused

                if fused.enabled():
                    fused.extension()
            self.model.compile(**dict(compile_kwargs or {}))  # compiled at the first forward pass
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))
        self.test_acc = MulticlassAccuracy(num_classes, top_k=1)
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))
        self._has_lwta = bool(lwta_modules(self.model))
        # eval loss and sparsities as metrics holding sums (exact under DDP: see BatchWeightedMean)
        self._mean_names = ["loss"]
        if self._has_lwta:
            self._mean_names += ["sparsity", *(f"sparsity/{name}" for name in lwta_modules(self.model))]
        self.eval_means = nn.ModuleDict({stage: nn.ModuleList(BatchWeightedMean() for _ in self._mean_names)
                                         for stage in ("val", "test")})
        # one per LWTA layer; keyed by position because module paths contain dots
        self.eval_entropy = nn.ModuleDict({stage: nn.ModuleList(WinEntropy(m.competitors)
                                                                for m in lwta_modules(self.model).values())
                                           for stage in ("val", "test")})
        self.planted_units: list[PlantedUnit] = []
        # layer -> [(units, concept mask planes, by presence)]
        self._planted_index: dict[str, list[tuple[Tensor, Tensor, bool]]] = {}
        self._planted_out: Optional[dict[str, Tensor]] = None
        if planted:
            if planted_weight <= 0:
                raise ValueError(f"planted_weight must be > 0, got {planted_weight}; set model.init_args.planted_weight")
            modules = dict(self.model.named_modules())
            missing = [layer for layer in planted if layer not in modules or not layer]
            if missing:
                raise ValueError(f"planted layer(s) {missing} not found in {model!r}; available: "
                                 f"{', '.join(n for n in modules if n and '.' not in n)}")
            for layer in planted:
                modules[layer].register_forward_hook(self._keep_planted_output(layer))

    def _keep_planted_output(self, layer: str):
        def hook(_module, _inputs, output):
            if self._planted_out is not None:
                self._planted_out[layer] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def setup(self, stage: str) -> None:
        """Resolve the planted concepts against the datamodule's concept names (needs the trainer's datamodule)."""
        if not self.hparams.planted or self._planted_index:
            return
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "concept_names", None) or [])
        categories = list(getattr(dm, "concept_categories", None) or [])
        if not names or not getattr(dm, "concept_masks", False):
            raise ValueError("planted units need concept masks in the training batches: use "
                             "lwta_vision.data.ConceptDataModule with concept_masks: true")
        category = dict(zip(names, categories))
        odd = [k for k in (self.hparams.planted_by or {}) if k not in category and k not in categories]
        if odd:
            raise ValueError(f"planted_by key(s) {odd} are neither concepts nor categories of the data; categories: "
                             f"{', '.join(dict.fromkeys(categories))}")
        lwta = lwta_modules(self.model)
        for layer, wanted in self.hparams.planted.items():
            wanted = names if list(wanted) == ["all"] else list(wanted)
            unknown = [c for c in wanted if c not in category]
            if unknown:
                raise ValueError(f"planted concept(s) {unknown} of {layer!r} are not concepts of the data; "
                                 f"available: {', '.join(names)}")
            inner = [m for n, m in lwta.items() if n == layer or n.startswith(layer + ".")]
            competitors = inner[-1].competitors if inner else 1  # the competition that produces the output
            how = dict(self.hparams.planted_by or {})
            by = [how.get(c, how.get(category[c], "mask")) for c in wanted]
            units = assign_units(layer, wanted, [category[c] for c in wanted], competitors, by=by)
            self.planted_units += units
            self._planted_index[layer] = [
                (torch.tensor([u.unit for u in group]), torch.tensor([names.index(u.concept) for u in group]),
                 kind == "presence")
                for kind in ("mask", "presence") if (group := [u for u in units if u.by == kind])]

    def lwta_implementation(self, device: Optional[torch.device] = None) -> Optional[dict]:
        """Which implementation draws this network's LWTA training noise on ``device`` (default: where the module
        is); None without LWTA layers."""
        modules = lwta_modules(self.model).values()
        if not modules:
            return None
        record = implementation(device or self.device)
        if record["name"] == "reference":
            return record
        # what the layers ask for can rule the kernel out whatever the device: impl='reference', soft samples, float64
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
        off = [m.impl == "reference" or not m.hard or precision.startswith("64") for m in modules]
        if any(off):
            reason = (f"{sum(off)} of {len(off)} LWTA layers run the reference (impl='reference', hard=False or "
                      f"float64)")
            record = {**record, "name": "reference" if all(off) else "mixed", "reason": reason}
        return record

    def on_fit_start(self) -> None:
        """Say which implementation draws the LWTA noise (the same seed trains another network with another one),
        and warn when a resumed run continues with a different one than it started with."""
        record = self.lwta_implementation()
        if record is None:
            return
        rank_zero_info(f"LWTA noise: {describe_implementation(record)}")
        started = getattr(self, "_resumed_lwta_implementation", None)
        if started and {k: v for k, v in started.items() if k != "torch"} != {
                k: v for k, v in record.items() if k != "torch"}:
            rank_zero_warn(f"this run started with LWTA noise from {describe_implementation(started)} and continues "
                           f"with {describe_implementation(record)}: the rest of the run draws other noise")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_lwta_implementation = checkpoint.get("lwta_implementation")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        record = self.lwta_implementation()
        if record is not None:  # which draws trained these weights (dissect.py prints it)
            checkpoint["lwta_implementation"] = record
        if self.planted_units:
            checkpoint["planted_units"] = [u.as_dict() for u in self.planted_units]
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "hparams", None) is not None:
            # what dissect.py needs to rebuild the probe set (image size, seed, ...) when config.yaml is missing
            checkpoint["datamodule"] = {"class_path": f"{type(dm).__module__}.{type(dm).__qualname__}",
                                        "init_args": {k: v for k, v in dm.hparams.items() if _plain(v)}}

    def _planted_loss(self, masks: Tensor) -> Tensor:
        total, groups = 0.0, 0
        for layer, entries in self._planted_index.items():
            out = self._planted_out[layer]
            for units, planes, presence in entries:
                if out.ndim < 2 or int(units.max()) >= out.shape[1]:
                    raise ValueError(f"planted units up to {int(units.max())} in {layer!r}, whose output has shape "
                                     f"{tuple(out.shape)}; plant fewer concepts or choose a wider layer")
                total = total + planted_loss(out.index_select(1, units.to(out.device)),
                                             masks.index_select(1, planes.to(masks.device)),
                                             self.hparams.planted_margin, presence)
                groups += 1
        return total / groups

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)  # no copy when it already is
        return self.model(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        log_now = self.trainer is not None and self.global_step % max(self.trainer.log_every_n_steps, 1) == 0
        want_kl = self.hparams.kl_weight > 0
        if self._planted_index:
            if len(batch) < 3:
                raise ValueError("planted units need concept masks in the training batches: set "
                                 "data.init_args.concept_masks: true")
            self._planted_out = {}
        try:
            if self._has_lwta and (log_now or want_kl):
                with collect_lwta_stats(self.model, sparsity=log_now, win_rates=log_now, kl=want_kl) as stats:
                    logits = self(x)
            else:
                stats, logits = None, self(x)
            loss = self._loss(logits, y)
            if self._planted_index:
                plant = self._planted_loss(batch[2])
                loss = loss + self.hparams.planted_weight * plant
                self.log("train/planted_loss", plant, on_step=True, on_epoch=True, sync_dist=True)
        finally:
            self._planted_out = None
        if want_kl and stats is not None and stats.kl:
            kl = stats.kl_total()
            loss = loss + self.hparams.kl_weight * kl
            self.log("train/kl", kl, on_step=True, on_epoch=False, sync_dist=True)
        if not torch.isfinite(loss):
            self._raise_non_finite(loss, x)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if stats is not None and stats.nonzero:
            self.log("train/sparsity", _mean(stats.sparsity.values()), on_step=True, on_epoch=False,
                     sync_dist=True)
            competitors = {name: m.competitors for name, m in lwta_modules(self.model).items()}
            self.log("train/win_entropy", _mean(stats.win_entropy(competitors).values()), on_step=True,
                     on_epoch=False, sync_dist=True)
        return loss

    def _raise_non_finite(self, loss: Tensor, x: Tensor) -> None:
        with torch.no_grad(), collect_lwta_stats(self.model) as stats:
            out = self.model(x)
        layers = ", ".join(f"{k}: nonzero={v:.3f}" for k, v in stats.sparsity.items()) or "no LWTA layers"
        raise NonFiniteLossError(
            f"loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}); "
            f"logits finite: {bool(torch.isfinite(out).all())}; input finite: {bool(torch.isfinite(x).all())}; "
            f"LWTA layers: {layers}. Lower the learning rate, enable gradient clipping "
            f"(trainer.gradient_clip_val) or use fp32 precision."
        )

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch[0], batch[1]
        values = {}
        if self._has_lwta:
            with collect_lwta_stats(self.model, win_rates=True) as stats:
                logits = self(x)
            values["sparsity"] = _mean(stats.sparsity.values())
            values.update({f"sparsity/{name}": v for name, v in stats.sparsity.items()})
            for name, metric in zip(lwta_modules(self.model), self.eval_entropy[stage]):
                metric.update(stats.wins[name])
                self.log(f"{stage}/win_entropy/{name}", metric)
        else:
            logits = self(x)
        values["loss"] = self._loss(logits, y)
        acc, acc5 = (self.val_acc, self.val_acc5) if stage == "val" else (self.test_acc, self.test_acc5)
        acc(logits, y)
        acc5(logits, y)
        for name, metric in zip(self._mean_names, self.eval_means[stage]):
            metric.update(values[name], x.shape[0])
            self.log(f"{stage}/{name}", metric, prog_bar=stage == "val" and name == "loss")
        self.log(f"{stage}/acc", acc, prog_bar=True)
        self.log(f"{stage}/acc_top5", acc5)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(-1)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_start(self) -> None:
        """Say when the schedule ends elsewhere than at the last epoch: a run resumed with another
        ``max_epochs`` keeps the length it started with, and a cosine past its ``T_max`` climbs back up."""
        epochs = self.trainer.max_epochs
        for config in self.trainer.lr_scheduler_configs:
            length = _schedule_length(config.scheduler)
            if length is not None and config.interval == "epoch" and epochs not in (None, -1) and length != epochs:
                rank_zero_warn(f"the learning-rate schedule ({type(config.scheduler).__name__}) lasts {length} "
                               f"epochs but trainer.max_epochs is {epochs}, so it does not end at the last epoch "
                               f"(a resumed run keeps the length it started with; start a new run to change it)")


# the length argument of epoch-based schedules (CosineAnnealingLR, OneCycleLR)
_LENGTH_ARGS = ("T_max", "total_steps")


def _schedule_length(scheduler) -> Optional[int]:
    for name in _LENGTH_ARGS:
        value = getattr(scheduler, name, None)
        if isinstance(value, int):
            return value
    return None


def _plain(value) -> bool:
    """JSON-like values only: checkpoints are read with weights_only=True, which refuses arbitrary objects."""
    import json

    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
