"""Label neurons in words at the end of validation epochs and log how the labels evolve."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lwta_vision.callbacks.run_dir import run_dir
from lwta_vision.concept_clip import is_concept_data
from lwta_vision.datasets.probe import ProbeSet
from lwta_vision.dissect.clip_dissect.labeling import HOLDOUT, label_records
from lwta_vision.dissect.clip_dissect.scorers import GroundTruthScorer, Scorer
from lwta_vision.dissect.concepts import load_concept_set
from lwta_vision.dissect.labels import QUALITY_NAMES, TIE_TOL, label_drift
from lwta_vision.dissect.pipeline import probe_loader
from lwta_vision.dissect.recording import LayerRecord, merge_records, record_activations, resolve_layers
from lwta_vision.dissect.report import write_tables


class NeuronDissection(Callback):
    """CLIP-Dissect-style labeling of chosen layers during training.

    The image-concept matrix (CLIP embeddings or ground truth) is computed once per run; each dissection
    only re-records the network's activations on the probe set, under ``no_grad`` with train/eval modes
    restored. The sanity-check pass is skipped. Under DDP each rank records a shard of the probe set and
    the shards are gathered, so every rank labels the same full matrix and ends in the same state.

    Logs per layer ``dissect/<layer>/unique_labels``, ``.../mean_score``, ``.../active_fraction``,
    ``.../ties`` (labels decided by the tie-break key, see :mod:`lwta_vision.dissect.clip_dissect.labeling`),
    ``.../label_drift`` (fraction of units whose label changed since the last dissection),
    ``.../label_corr``, ``.../label_auprc``, ``.../label_base_rate``, ``.../label_{f1,iou}_{005,02}`` (label
    quality averaged over the labelled units, on the half of the probe held out from choosing the labels: how
    describable the layer is, see :mod:`lwta_vision.dissect.evaluate.quality`) and the in-sample
    ``.../label_{corr,auprc}_insample``, writes the label
    table as CSV under ``<run folder>/dissection/epoch_<n>/`` (the folder holding the run's ``checkpoints/``
    and ``config.yaml``, see :func:`~lwta_vision.callbacks.run_dir.run_dir`) and, with a wandb logger, the label table
    and every active unit's top images (highlighted where it fires) as wandb media in the run's folder.

    Args:
        layers: module paths inside the LightningModule's ``model`` (e.g. ``layer3``, ``fc``).
        every_n_epochs: dissect every n validation epochs.
        probe_split: which split of the datamodule to probe ("val", "test" or "train").
        probe: an explicit probe set instead (e.g. an image folder); overrides ``probe_split``.
        max_probe_images: use only the first n probe images (faster; None = all).
        scorer: image-concept scorer; default: the concept CLIP on the generated data
            (:class:`~lwta_vision.concept_clip.scorer.ConceptCLIPScorer`), ground truth on other annotated
            data (Broden), else it must be given (e.g. a ``CLIPScorer``).
        concepts: concept set name or text file; default: the ground-truth scorer's concepts, else "20k".
        similarity, similarity_kwargs: see ``lwta_vision.dissect.clip_dissect.similarity``.
        pooling, token_pooling: per-neuron summary of conv maps / token outputs.
        batch_size: probe batch size.
        table_images: top images per unit in the wandb table.
        iou_layers: conv layers to also dissect by IoU against concept masks (Network Dissection; the probe
            data must carry masks, e.g. the generated data). Logs ``dissect/<layer>/detectors``,
            ``.../unique_concepts``, ``.../mean_iou``. Every rank computes it on the full probe set.
        iou_quantile, iou_threshold: NetDissect's top quantile (0.005) and detector threshold (0.04).
        tie_tol: soft-WPMI scores closer than this are ties, decided by the contrast key (see
            :mod:`lwta_vision.dissect.clip_dissect.labeling`).
        holdout: fraction of the probe images held out from choosing labels, on which label quality is
            measured (a seeded hash of each image's index; 0: choose on all, report in-sample quality only).
    """

    def __init__(
        self,
        layers: list[str],
        every_n_epochs: int = 1,
        probe_split: str = "val",
        probe: Optional[ProbeSet] = None,
        max_probe_images: Optional[int] = None,
        scorer: Optional[Scorer] = None,
        concepts: Optional[str] = None,
        similarity: str = "soft_wpmi",
        similarity_kwargs: Optional[dict] = None,
        pooling: str = "mean",
        token_pooling: str = "cls",
        batch_size: int = 128,
        table_images: int = 3,
        iou_layers: Optional[list[str]] = None,
        iou_quantile: float = 0.005,
        iou_threshold: float = 0.04,
        tie_tol: float = TIE_TOL,
        holdout: float = HOLDOUT,
    ):
        if every_n_epochs < 1:
            raise ValueError(f"NeuronDissection every_n_epochs must be >= 1, got {every_n_epochs}")
        self.layers = list(layers)
        self.every_n_epochs, self.probe_split, self.probe = every_n_epochs, probe_split, probe
        self.max_probe_images, self.scorer, self.concepts_spec = max_probe_images, scorer, concepts
        self.similarity, self.similarity_kwargs = similarity, dict(similarity_kwargs or {})
        self.pooling, self.token_pooling, self.batch_size = pooling, token_pooling, batch_size
        self.table_images = table_images
        self.iou_layers = list(iou_layers or [])
        self.iou_quantile, self.iou_threshold = iou_quantile, iou_threshold
        if not (tie_tol >= 0 and tie_tol < float("inf")):
            raise ValueError(f"NeuronDissection tie_tol must be a finite number >= 0, got {tie_tol}")
        self.tie_tol = tie_tol
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"NeuronDissection holdout must be in [0, 1), got {holdout}")
        self.holdout = holdout
        self.previous_labels: dict[str, list[Optional[str]]] = {}
        self.history: list[dict[str, Any]] = []
        self._image_concept = None  # a tensor, or the scorer's embeddings (EmbeddingProduct)
        self._concepts: Optional[list[str]] = None

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resolve_layers(_network(pl_module), self.layers + self.iou_layers)  # fail before training starts
        _check_after_weight_averaging(trainer.callbacks, self)
        if self.probe is None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "probe_set"):
                raise ValueError("NeuronDissection needs a datamodule with probe_set() or an explicit probe=")
            self.probe = dm.probe_set(self.probe_split)
        if self.max_probe_images is not None and self.max_probe_images < len(self.probe):
            self.probe = self.probe.first(self.max_probe_images)

    def _ensure_concepts(self, pl_module: L.LightningModule) -> None:
        if self._image_concept is not None:
            return
        if self.scorer is None:
            if is_concept_data(self.probe.dataset):  # CLIP-Dissect proper, with the CLIP that knows this data
                from lwta_vision.concept_clip.scorer import ConceptCLIPScorer

                self.scorer = ConceptCLIPScorer(device=str(pl_module.device))
            elif hasattr(self.probe.dataset, "presence_matrix"):
                self.scorer = GroundTruthScorer.from_dataset(self.probe.dataset)
            else:
                raise ValueError(
                    "NeuronDissection: the probe data has no concept annotations; set scorer (e.g. "
                    "class_path: lwta_vision.dissect.clip_dissect.CLIPScorer) in the callback's init_args"
                )
        if self.concepts_spec is None:
            concepts = list(getattr(self.scorer, "concept_names", None) or load_concept_set("20k"))
        else:
            concepts = load_concept_set(self.concepts_spec)
        self._concepts = concepts
        self._image_concept = self.scorer.image_concept(self.probe, concepts).float().cpu()

    # -- the work ----------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # Dissection must not change training: building a scorer initialises a model and every DataLoader
        # iterator draws a seed from the global generator, so without this fork the network a run trains
        # would depend on the dissection settings and on whether the CLIP embeddings were already cached.
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self._dissect(trainer, pl_module)

    def _dissect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_concepts(pl_module)
        net = _network(pl_module)
        world, rank = trainer.world_size, trainer.global_rank
        indices = list(range(rank, len(self.probe), world))
        loader = probe_loader(self.probe, self.batch_size, 0, indices)
        top_k = max(int(self.similarity_kwargs.get("top_k", 100)), self.table_images)
        records = record_activations(net, self.layers, loader, self.pooling, self.token_pooling, top_k,
                                     pl_module.device)
        if world > 1:
            records = _gather_records(trainer, records, len(self.probe), top_k)
        results = label_records(records, self._image_concept, self._concepts, self.similarity,
                                self.similarity_kwargs, self.tie_tol, pl_module.device, holdout=self.holdout)
        epoch = trainer.current_epoch
        entry = {"epoch": epoch}
        for layer, res in results.items():
            labels = res.labels
            drift = label_drift(self.previous_labels[layer], labels) if layer in self.previous_labels else float("nan")
            self.previous_labels[layer] = labels
            values = {
                "unique_labels": res.summary["unique_labels"],
                "mean_score": res.summary["mean_top_score"],
                "active_fraction": res.summary["active_fraction"],
                "ties": res.summary["ties"],
                # how describable the layer is: label quality averaged over its labelled units, on the probe
                # images held out from choosing the labels (and, to show the gap, on the choosing ones)
                **{name: res.summary.get(f"mean_{name}") for name in QUALITY_NAMES},
            }
            metrics = {k: float(v) for k, v in values.items() if v is not None}  # None: undefined (no label)
            if drift == drift:  # not NaN: a previous dissection exists
                metrics["label_drift"] = drift
            for k, v in metrics.items():
                pl_module.log(f"dissect/{layer}/{k}", v, on_epoch=True, sync_dist=False, rank_zero_only=True)
            entry[layer] = metrics
            rank_zero_info(f"dissection epoch {epoch} {layer}: " + console_line(res.summary, drift))
        for layer in self.iou_layers:
            from lwta_vision.dissect.netdissect.iou import iou_dissect

            iou_labels, _ = iou_dissect(net, layer, self.probe, quantile=self.iou_quantile,
                                        iou_threshold=self.iou_threshold, batch_size=self.batch_size,
                                        device=pl_module.device)
            s = iou_labels.summary
            metrics = {"detectors": float(s["detectors"]), "unique_concepts": float(s["unique_concepts"]),
                       "mean_iou": float(s["mean_iou"]) if s["detectors"] else 0.0}
            for k, v in metrics.items():
                pl_module.log(f"dissect/{layer}/{k}", v, on_epoch=True, sync_dist=False, rank_zero_only=True)
            entry.setdefault(layer, {}).update(metrics)
            results[f"{layer}.iou"] = iou_labels
            rank_zero_info(f"dissection epoch {epoch} {layer} IoU: {s['detectors']}/{s['units']} detectors, "
                           f"{s['unique_concepts']} unique concepts, mean IoU {metrics['mean_iou']:.3f}")
        self.history.append(entry)
        # run_dir is a collective under DDP (a broadcast): every rank must ask, not only rank 0
        out = run_dir(trainer) / "dissection" / f"epoch_{epoch:03d}"
        self._write(trainer, results, epoch, out, net, pl_module.device)

    @rank_zero_only
    def _write(self, trainer: L.Trainer, results, epoch: int, out: Path, net=None, device=None) -> None:
        write_tables(out, results, meta={"epoch": epoch, "probe": self.probe.name, "similarity": self.similarity})
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb_tables(logger, results, epoch, net, device)

    def _log_wandb_tables(self, logger: WandbLogger, results, epoch: int, net=None, device=None) -> None:
        """Per layer: the label table, and each active unit's top images (highlighted where the unit fires) as
        captioned images.

        The images are logged as plain media, not inside the table: wandb stores a table's images in its
        artifact staging folder (``~/.local/share/wandb``), outside the run folder, so copying ``runs/wandb``
        for ``wandb sync`` would lose them; plain media go to the run's ``files/media/images``.
        """
        import numpy as np
        import wandb

        from lwta_vision.dissect.recording import spatial_maps
        from lwta_vision.dissect.report import HIGHLIGHT_LEVEL, highlight

        columns = ["layer", "unit", "label", "score", "label_2", "label_3", "margin", "decided_by", *QUALITY_NAMES,
                   "win_rate", "active", "top_images"]
        for layer, res in results.items():
            data = [[layer] + [r.as_dict()[c] for c in columns[1:-1]] + [" ".join(map(str, r.top_images))]
                    for r in res.rows]
            logger.log_table(key=f"dissect/{layer}/labels", columns=columns, data=data)
            shown = {r.unit: r.top_images[: self.table_images] for r in res.rows if r.active and r.top_images}
            if not shown:
                continue
            idx = sorted({i for v in shown.values() for i in v})
            maps = None
            if net is not None and not layer.endswith(".iou"):
                m = spatial_maps(net, layer, self.probe.network_dataset(), idx, device)
                maps = m if m.ndim == 4 else None
            pos = {i: p for p, i in enumerate(idx)}
            strips = []
            for r in res.rows:
                if r.unit not in shown:
                    continue
                tiles = [np.asarray(self.probe.raw(i).convert("RGB").resize((64, 64))) for i in shown[r.unit]]
                if maps is not None:
                    um = maps[[pos[i] for i in shown[r.unit]], r.unit].numpy()
                    lo, hi = float(um.min()), float(um.max())
                    if hi > lo:
                        tiles = [highlight(t, u, lo + HIGHLIGHT_LEVEL * (hi - lo)) for t, u in zip(tiles, um)]
                score = "" if r.score is None else f" ({r.score:.3g})"
                quality = "" if r.label_auprc is None else f", held-out AUPRC {r.label_auprc:.2f}"
                strips.append(wandb.Image(np.concatenate(tiles, axis=1), caption=f"unit {r.unit}: {r.label}{score}{quality}"))
            logger.experiment.log({f"dissect/{layer}/top_images": strips, "epoch": epoch})

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"previous_labels": self.previous_labels, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_labels = dict(state_dict.get("previous_labels", {}))
        self.history = list(state_dict.get("history", []))


def console_line(summary: dict, drift: float = float("nan")) -> str:
    """One line for the console: unique labels, active units, label quality and drift (no NaN printed)."""
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    parts = [f"{summary.get('unique_labels', 0)} unique labels",
             f"{summary.get('active_units', 0)}/{summary.get('units', 0)} units active"]
    if summary.get("mean_label_corr") is not None:
        parts.append(f"held-out label quality corr {num(summary['mean_label_corr'], '.2f')}, AUPRC "
                     f"{num(summary.get('mean_label_auprc'), '.2f')} (chance {num(summary.get('mean_label_base_rate'), '.2f')}"
                     f"; in-sample {num(summary.get('mean_label_auprc_insample'), '.2f')})")
    elif summary.get("mean_label_corr_insample") is not None:
        parts.append(f"in-sample label quality corr {num(summary['mean_label_corr_insample'], '.2f')}, AUPRC "
                     f"{num(summary.get('mean_label_auprc_insample'), '.2f')} (nothing held out)")
    if drift == drift:
        parts.append(f"drift {drift:.2f}")
    if summary.get("ties"):
        parts.append(f"{summary['ties']} ties decided by the second key")
    return ", ".join(parts)


def _network(pl_module: L.LightningModule) -> torch.nn.Module:
    """The backbone inside the LightningModule (layer paths are relative to it)."""
    return getattr(pl_module, "model", pl_module)


def _gather_records(trainer: L.Trainer, records, num_images: int, top_k: int):
    """All-gather each rank's shard (padded to equal length, padding marked by image id -1) and merge.

    The win/input counts travel as float64 and the merge sums them, so the rates, the top images (ties go
    to the smaller image id) and therefore the labels equal those of one process recording the whole probe.
    """
    strategy, world = trainer.strategy, trainer.world_size
    dev = strategy.root_device
    n_max = -(-num_images // world)
    gathered = {}
    for name, rec in records.items():
        pad = n_max - rec.pooled.shape[0]
        pooled = torch.cat([rec.pooled, rec.pooled.new_zeros(pad, rec.num_units)])
        ids = torch.cat([rec.image_ids, rec.image_ids.new_full((pad,), -1)])
        g_pooled = strategy.all_gather(pooled.to(dev)).cpu()
        g_ids = strategy.all_gather(ids.to(dev)).cpu()
        g_win = strategy.all_gather(rec.win_count.double().to(dev)).cpu()
        g_inp = strategy.all_gather(rec.input_count.double().to(dev)).cpu()
        shards = []
        for r in range(world):
            keep = g_ids[r] >= 0
            n = int(keep.sum())
            shards.append(LayerRecord(name, g_pooled[r][keep], g_pooled[r][:0], g_ids[r][:0],
                                      (g_win[r] / max(n * rec.positions, 1)).float(), (g_inp[r] / max(n, 1)).float(),
                                      rec.spatial, g_ids[r][keep], g_win[r], g_inp[r], rec.positions))
        gathered[name] = merge_records(shards, top_k)
    return gathered


def _check_after_weight_averaging(callbacks: list, dissection: "NeuronDissection") -> None:
    """Weight averaging (EMA) swaps the averaged weights in when validation starts and back when it ends, in
    callback order: a dissection listed after it would describe the raw weights while validation reports the
    averaged ones. train.py's ``ema`` option places it correctly; a list built by hand is checked here."""
    try:
        from lightning.pytorch.callbacks import WeightAveraging
    except ImportError:  # Lightning < 2.6 has none
        return
    mine = callbacks.index(dissection) if dissection in callbacks else -1
    early = [type(cb).__name__ for cb in callbacks[:max(mine, 0)] if isinstance(cb, WeightAveraging)]
    if early:
        raise ValueError(f"{early[0]} comes before NeuronDissection in trainer.callbacks, so the dissection would "
                         f"describe the raw weights, not the averaged ones; list it after NeuronDissection (or use "
                         f"train.py's ema option, which does)")
