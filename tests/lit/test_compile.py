"""``compile: true`` compiles the backbone in place: the same state_dict keys and checkpoints, LWTA as one op
in the graph, hooks (statistics, dissection) that still see every layer, and it trains through the CLI with
bf16-mixed and channels-last. DDP with compile is in test_distributed.py."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lwta_vision.cli import cli_main
from lwta_vision.dissect.recording import record_activations
from lwta_vision.lit import LitClassifier

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
KW = {"widths": [16, 32, 64], "act": "lwta", "act_kwargs": {"competitors": 4}}


class CountingBackend:
    """A torch.compile backend that runs the graph as traced and keeps what it was given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def ops(self) -> set[str]:
        return {str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"}


def _pair(backend):
    torch.manual_seed(0)
    plain = LitClassifier(model="convnet_small", model_kwargs=KW)
    compiled = LitClassifier(model="convnet_small", model_kwargs=KW, compile=True, compile_kwargs={"backend": backend})
    compiled.load_state_dict(plain.state_dict())
    return plain, compiled


def test_compile_keeps_state_dict_keys_and_puts_lwta_in_the_graph_as_one_op():
    backend = CountingBackend()
    plain, compiled = _pair(backend)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    compiled.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x), plain(x), atol=1e-5)  # eval: the deterministic argmax winner
    compiled.train()
    F.cross_entropy(compiled(x), y).backward()
    assert backend.graphs, "the backbone was not compiled"
    assert any("lwta_vision.lwta_fused" in op for op in backend.ops())  # the fused op, no graph break around it
    assert all(p.grad is not None for p in compiled.parameters())
    # its state (BatchNorm statistics moved by the step) loads into an uncompiled module: same outputs
    again = LitClassifier(model="convnet_small", model_kwargs=KW)
    again.load_state_dict(compiled.state_dict())
    compiled.eval(), again.eval()
    with torch.no_grad():
        assert torch.allclose(again(x), compiled(x), atol=1e-5)


def test_hooks_and_dissection_recording_see_the_layers_of_a_compiled_backbone():
    plain, compiled = _pair("aot_eager")
    plain.eval(), compiled.eval()
    seen = []
    handle = compiled.model.layer3.act.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        compiled(torch.randn(4, 3, 32, 32))
    handle.remove()
    assert seen == [(4, 64, 8, 8)]
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(16, 3, 32, 32, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    a = record_activations(compiled.model, ["layer2", "layer3.act"], loader, top_k=5)
    b = record_activations(plain.model, ["layer2", "layer3.act"], loader, top_k=5)
    for layer in a:
        assert torch.allclose(a[layer].pooled, b[layer].pooled, atol=1e-5)
        assert torch.equal(a[layer].win_rate, b[layer].win_rate)


def test_compile_kwargs_without_compile_is_a_clear_error():
    with pytest.raises(ValueError, match="compile is false; set model.init_args.compile: true"):
        LitClassifier(model="convnet_small", compile_kwargs={"mode": "max-autotune"})


def test_compiled_fit_with_bf16_channels_last_and_dissection_through_the_cli(tmp_path):
    # the default backend (inductor): what a user gets from --model.init_args.compile true
    cli = cli_main(["fit", "--config", QUICK, "--data.init_args.num_train", "64", "--data.init_args.num_val", "32",
                    "--data.init_args.num_test", "32", "--data.init_args.batch_size", "32",
                    "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", "--trainer.callbacks.init_args.max_probe_images", "32",
                    "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path),
                    "--model.init_args.compile", "true", "--model.init_args.channels_last", "true",
                    "--trainer.precision", "bf16-mixed"])
    assert cli.trainer.state.finished and cli.model.hparams.compile
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["val/loss"])) and float(metrics["dissect/layer3/unique_labels"]) >= 1
    run = next(tmp_path.glob("**/version_0"))
    assert (run / "dissection" / "epoch_000" / "layer3.csv").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    plain = LitClassifier.load_from_checkpoint(ckpt, compile=False, channels_last=False)  # loads uncompiled
    assert list(plain.state_dict()) == list(cli.model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), cli.model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), cli.model.cpu()(x), atol=1e-4)
