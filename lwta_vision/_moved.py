"""Module paths from before the layout of one folder per method keep importing (user code, configs'
``class_path``), resolved to the module that now holds the names, with a FutureWarning."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "lwta_vision.dissect.broden": "lwta_vision.datasets.broden",
    "lwta_vision.dissect.probe": "lwta_vision.datasets.probe",
    "lwta_vision.dissect.engine": "lwta_vision.dissect.clip_dissect.labeling",
    "lwta_vision.dissect.scorers": "lwta_vision.dissect.clip_dissect",
    "lwta_vision.dissect.similarity": "lwta_vision.dissect.clip_dissect.similarity",
    "lwta_vision.dissect.iou": "lwta_vision.dissect.netdissect.iou",
    "lwta_vision.dissect.generative": "lwta_vision.dissect.dnd.generative",
    "lwta_vision.dissect.quality": "lwta_vision.dissect.evaluate.quality",
    "lwta_vision.dissect.planted": "lwta_vision.dissect.evaluate.planted",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: answers only for the old names, which no file provides any more."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        new = MOVED[module.__name__]
        # FutureWarning: shown by default (a DeprecationWarning raised inside the import machinery is not)
        warnings.warn(f"{module.__name__} moved to {new}; import it from there", FutureWarning, stacklevel=2)
        # the import system returns whatever sys.modules holds under the name after exec_module
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
