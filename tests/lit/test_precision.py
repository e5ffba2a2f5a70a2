"""Mixed precision (bf16) and channels-last with LWTA layers: the competition keeps its numerics, the memory
format changes nothing but speed, and both switches run through the training CLI."""
import math
from pathlib import Path

import pytest
import torch

from lwta_vision.cli import cli_main
from lwta_vision.layers import LWTA
from lwta_vision.layers.lwta import lwta
from lwta_vision.lit import LitClassifier

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["--data.init_args.num_train", "128", "--data.init_args.num_val", "64", "--data.init_args.num_test", "32",
        "--data.init_args.batch_size", "32", "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.callbacks.init_args.max_probe_images", "32"]


def _sample(x, competitors, hard=True, seed=1):
    return lwta(x, competitors, dim=1, training=True, hard=hard, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("competitors", [2, 4])
def test_bf16_competition_runs_in_fp32(competitors):
    # bf16 inputs and the same values in fp32, the same noise: the same winners, and the output keeps bf16.
    # (Adding the noise in bf16 rounded nearby noisy logits into ties and changed ~0.05% of the winners.)
    x = torch.randn(16, 32, 6, 6).bfloat16()
    out16, out32 = _sample(x, competitors), _sample(x.float(), competitors)
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16.float(), out32)  # x * one-hot: exact when the winners agree
    soft16, soft32 = _sample(x, competitors, hard=False), _sample(x.float(), competitors, hard=False)
    assert soft16.dtype == torch.bfloat16
    assert torch.allclose(soft16.float(), soft32, rtol=1e-2, atol=1e-2)

    # gradients (straight-through): bf16, finite, and the fp32 gradient up to bf16 rounding
    x16 = x.clone().requires_grad_()
    x32 = x.float().requires_grad_()
    w = torch.randn(x.shape)
    (_sample(x16, competitors).float() * w).sum().backward()
    (_sample(x32, competitors) * w).sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and torch.isfinite(x16.grad).all()
    assert torch.allclose(x16.grad.float(), x32.grad, rtol=2e-2, atol=2e-2)


def test_bf16_argmax_winners_equal_fp32_winners_without_near_ties():
    x = torch.randn(64, 32, 4, 4)
    win32 = lwta(x, 4, dim=1, training=False) != 0
    win16 = lwta(x.bfloat16(), 4, dim=1, training=False) != 0
    blocks = x.reshape(64, 8, 4, 4, 4)
    top2 = blocks.topk(2, dim=2).values
    clear = (top2[:, :, 0] - top2[:, :, 1]) > 2 ** -6 * top2[:, :, 0].abs().clamp_min(1)  # far above bf16 spacing
    clear = clear.unsqueeze(2).expand_as(blocks).reshape(x.shape)
    assert clear.float().mean() > 0.9
    assert torch.equal(win16[clear], win32[clear])


def test_lwta_under_cpu_autocast_bf16():
    conv, act = torch.nn.Conv2d(3, 16, 3, padding=1), LWTA(4, dim=1).train()
    x = torch.randn(8, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre = conv(x)
        torch.manual_seed(3)
        out = act(pre)
    assert pre.dtype == out.dtype == torch.bfloat16
    torch.manual_seed(3)
    ref = act(pre.float())  # the same bf16 pre-activations, competed in fp32 outside autocast
    assert torch.equal(out.float(), ref)
    assert (out != 0).float().mean().item() == pytest.approx(0.25)


@pytest.mark.parametrize("competitors", [2, 4])
def test_lwta_on_channels_last_tensors_matches_contiguous(competitors):
    x = torch.randn(4, 16, 5, 7)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    for training in (False, True):
        a = lwta(x, competitors, dim=1, training=training, generator=torch.Generator().manual_seed(0))
        b = lwta(x_cl, competitors, dim=1, training=training, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, b)  # competition along channels, not along the memory-innermost axis
    # and the gradients
    xa, xb = x.clone().requires_grad_(), x_cl.clone().requires_grad_()
    w = torch.randn(x.shape)
    (_sample(xa, competitors) * w).sum().backward()
    (_sample(xb, competitors) * w).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)


@pytest.mark.parametrize("model,kwargs", [
    ("convnet_small", {"widths": [8, 16, 32], "act": "lwta", "act_kwargs": {"competitors": 4}}),
    ("resnet18", {"stem": "cifar", "act": "lwta", "act_kwargs": {"competitors": 2}}),
])
def test_channels_last_classifier_matches_contiguous(model, kwargs):
    torch.manual_seed(0)
    a = LitClassifier(model, kwargs, num_classes=6).eval()
    torch.manual_seed(0)
    b = LitClassifier(model, kwargs, num_classes=6, channels_last=True).eval()
    conv_weights = [p for p in b.model.parameters() if p.ndim == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)
    # checkpoints load into either layout
    a.load_state_dict(b.state_dict())
    b.load_state_dict(a.state_dict())


def _record_lwta_inputs(monkeypatch) -> list[tuple[torch.Tensor, bool]]:
    """Every LWTA input (first image) and whether CPU autocast was on."""
    seen = []
    forward = LWTA.forward

    def spy(self, x):
        seen.append((x.detach()[:1], torch.is_autocast_enabled("cpu")))
        return forward(self, x)

    monkeypatch.setattr(LWTA, "forward", spy)
    return seen


def _logger(tmp_path):
    return ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]


def test_fast_dev_run_bf16_mixed(tmp_path, monkeypatch):
    seen = _record_lwta_inputs(monkeypatch)
    cli = cli_main(["fit", "--config", QUICK, *TINY, *_logger(tmp_path), "--trainer.precision", "bf16-mixed"])
    assert cli.trainer.state.finished and cli.trainer.precision == "bf16-mixed"
    # training and validation steps: bf16 pre-activations (the dissection callback records in fp32, outside)
    under_autocast = [t for t, autocast in seen if autocast]
    assert len(under_autocast) >= 3 * 4 and all(t.dtype == torch.bfloat16 for t in under_autocast)
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss_step"])) and math.isfinite(float(metrics["val/loss"]))


def test_fast_dev_run_channels_last(tmp_path, monkeypatch):
    seen = _record_lwta_inputs(monkeypatch)
    cli = cli_main(["fit", "--config", QUICK, *TINY, *_logger(tmp_path), "--model.channels_last", "true"])
    assert cli.trainer.state.finished and cli.model.hparams.channels_last
    steps = [t for t, _ in seen][:3 * 2]  # 3 LWTA layers x 2 training steps
    assert len(steps) == 6 and all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                                   for t in steps)
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss_step"]))
