"""The torch-only core never imports Lightning or wandb, not even transitively (STYLE.md)."""
import subprocess
import sys

TORCH_ONLY = ["lwta_vision.layers", "lwta_vision.models", "lwta_vision.datasets", "lwta_vision.dissect",
              "lwta_vision.dissect.generative", "lwta_vision.concept_clip", "lwta_vision.concept_clip.scorer",
              "lwta_vision.concept_clip.train"]


def test_torch_only_core_imports_no_lightning_or_wandb():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_ONLY)
            + "from lwta_vision.dissect.concepts import load_concept_set; load_concept_set('generated')\n"
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
