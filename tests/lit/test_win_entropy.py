"""Sparsity users can see: LitClassifier logs each LWTA layer's active fraction and win-rate entropy."""
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lwta_vision.layers import lwta_modules
from lwta_vision.lit import LitClassifier
from lwta_vision.lit.classifier import WinEntropy


def test_win_entropy_metric_pools_the_whole_split_not_batch_means():
    m = WinEntropy(4)
    m.update(torch.tensor([8.0, 0, 0, 0]))  # batch 1: unit 0 wins everything (entropy 0 on its own)
    m.update(torch.tensor([0.0, 8, 0, 0]))  # batch 2: unit 1 does
    assert float(m.compute()) == pytest.approx(0.5)  # over the split two of four units share: log 2 / log 4
    m.reset()
    m.update(torch.tensor([3.0, 0, 0, 0]))
    assert float(m.compute()) == 0.0
    m.update(torch.tensor([0.0, 3, 3, 3]))  # 3 wins each in total
    assert float(m.compute()) == pytest.approx(1.0)


def test_val_and_train_win_entropy_are_logged_per_layer():
    torch.manual_seed(0)
    x, y = torch.randn(96, 3, 16, 16), torch.randint(0, 3, (96,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = LitClassifier(model="convnet_small", num_classes=3, in_channels=3, model_kwargs={
        "widths": [8, 16, 16], "act": "lwta", "act_kwargs": {"competitors": 4}})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        num_sanity_val_steps=0)
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    layers = list(lwta_modules(model.model))
    assert layers
    for name in layers:
        assert float(metrics[f"val/sparsity/{name}"]) == pytest.approx(0.25)
        # a random network on random images: every unit wins somewhere, unevenly (neither 0 nor exactly 1)
        assert 0.3 < float(metrics[f"val/win_entropy/{name}"]) < 1.0
    assert 0.3 < float(metrics["train/win_entropy"]) <= 1.0
