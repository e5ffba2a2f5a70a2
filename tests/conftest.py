"""Shared test setup: no network, offline wandb, seeded, few threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONHASHSEED", "0")
if "LWTA_VISION_CACHE" not in os.environ:  # CLIP embedding caches of the tests stay out of the user's cache
    import tempfile

    os.environ["LWTA_VISION_CACHE"] = tempfile.mkdtemp(prefix="lwta-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    yield
