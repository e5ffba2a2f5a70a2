"""Which LWTA implementation drew the noise is recorded: config.yaml, the checkpoint, the console, dissect.py."""
from pathlib import Path

import pytest
import torch

from lwta_vision.cli import cli_main
from lwta_vision.dissect_cli import main as dissect_main
from lwta_vision.layers import describe_implementation, fused, implementation

ROOT = Path(__file__).resolve().parents[2]


def test_the_record_names_the_kernel_and_its_noise_version_or_the_reference(monkeypatch):
    here = implementation()
    if fused.extension() is not None:
        assert here["name"] == "fused_cpu" and here["noise_version"] == fused.NOISE_VERSION
        assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert f"noise v{fused.NOISE_VERSION}" in describe_implementation(here)
    else:
        assert here["name"] == "reference"
    assert implementation("cuda")["name"] == "reference"  # nothing is built or run for the question
    monkeypatch.setenv("LWTA_VISION_FUSED", "0")
    off = implementation()
    assert off == {"name": "reference", "reason": "LWTA_VISION_FUSED=0", "torch": torch.__version__.split("+")[0]}
    assert describe_implementation(off).startswith("reference torch ops: LWTA_VISION_FUSED=0")
    assert describe_implementation(None).startswith("not recorded")


@pytest.mark.parametrize("fused_on", [True, False], ids=["fused", "reference"])
def test_a_run_records_its_implementation_everywhere(tmp_path, monkeypatch, capsys, caplog, fused_on):
    caplog.set_level("INFO")
    if not fused_on:
        monkeypatch.setenv("LWTA_VISION_FUSED", "0")
    expected = implementation()
    cli_main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--data.init_args.num_train", "128", "--data.init_args.num_val", "64",
              "--data.init_args.batch_size", "32", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
              "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)])
    line = describe_implementation(expected)
    assert f"LWTA noise: {line}" in caplog.text  # the console, at the start of fit
    config = next(tmp_path.glob("**/config.yaml")).read_text()
    assert config.startswith(f"# LWTA noise drawn by: {line} ")
    ckpt_path = next(tmp_path.glob("**/checkpoints/last.ckpt"))
    assert torch.load(ckpt_path, weights_only=True)["lwta_implementation"] == expected
    capsys.readouterr()
    metrics = dissect_main(["evaluate", "--checkpoint", str(ckpt_path), "--device", "cpu", "--sentence_model", "null",
                            "--scorer", "ground_truth"])
    assert metrics["weights"] == f"from the checkpoint (LWTA noise drawn by {line})"
    assert f"LWTA noise drawn by {line}" in capsys.readouterr().err


def test_layers_that_ask_for_the_reference_are_recorded_as_such():
    if fused.extension() is None:
        pytest.skip("the fused kernel is not built here: every layer runs the reference anyway")
    quick = str(ROOT / "configs" / "quickstart.yaml")
    cli = cli_main(["--config", quick, "--model.init_args.act_kwargs", '{"competitors": 4, "impl": "reference"}'],
                   run=False)
    record = cli.model.lwta_implementation(torch.device("cpu"))
    assert record["name"] == "reference" and "3 of 3 LWTA layers" in record["reason"]
    assert describe_implementation(record).startswith("reference torch ops: 3 of 3 LWTA layers run the reference")
    default = cli_main(["--config", quick], run=False).model.lwta_implementation(torch.device("cpu"))
    assert default["name"] == "fused_cpu"
