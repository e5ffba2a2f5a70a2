"""The layout's rules, read from the code's own imports (STYLE.md): dependencies point one way, the torch-only
core never imports Lightning or wandb, not even transitively, and data never imports dissection."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import lwta_vision

PACKAGE = Path(lwta_vision.__file__).parent

# Each part may import only parts of a lower rank (and itself). The concept CLIP's architecture is a model;
# its scorer and trainer build on CLIP-Dissect.
RANK = {
    "layers": 0, "datasets": 0, "_moved": 0,
    "models": 1, "concept_clip": 1,
    "dissect": 2,
    "concept_clip.scorer": 3, "concept_clip.train": 3, "concept_clip.__main__": 4,
    "data": 3, "lit": 3, "checkpoints": 3, "loggers": 3,
    "callbacks": 4, "provenance": 4,  # provenance: what shapes a figure (reads data, layers, dissect defaults)
    "cli": 5,
    "dissect_cli": 6,
}
TORCH_ONLY = ("layers", "models", "datasets", "dissect", "concept_clip")
# inside dissect: the machinery every method shares, the methods, and evaluation of their labels
SHARED = {"cache", "concepts", "errors", "labels", "pipeline", "ranking", "recording", "report"}
METHODS = {"clip_dissect", "netdissect", "dnd"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = ("lwta_vision",) + f.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every lwta_vision module imported anywhere in the file (function-level imports too)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    # a module-level __getattr__ (PEP 562) re-exports a public name lazily, only when it is asked for
    lazy = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from lwta_vision import concept_clip`
    return {m for m in found if m.startswith("lwta_vision.")}


def _part(module: str) -> str:
    parts = module.split(".")[1:]
    two = ".".join(parts[:2])
    return two if two in RANK else parts[0]


def _edges() -> dict[tuple[str, str], list[str]]:
    modules = _modules()
    edges: dict[tuple[str, str], list[str]] = {}
    for module, path in modules.items():
        if module == "lwta_vision":
            continue
        for target in _imports(path, module):
            while target not in modules and "." in target:  # `from pkg import name`: the module that holds it
                target = target.rpartition(".")[0]
            if target in modules and target != "lwta_vision":
                edges.setdefault((module, target), []).append(module)
    return edges


def test_every_part_has_a_rank():
    parts = {_part(m) for m in _modules() if m != "lwta_vision"}
    assert parts <= set(RANK), f"give {sorted(parts - set(RANK))} a rank in RANK"


def test_dependencies_point_one_way():
    edges = _edges()
    assert ("lwta_vision.models.convnet", "lwta_vision.layers") in edges  # the reader sees imports at all
    wrong = sorted(f"{a} -> {b}" for a, b in edges
                   if _part(a) != _part(b) and RANK[_part(a)] <= RANK[_part(b)])
    assert not wrong, "imports against the layers (cli -> callbacks/lit/data -> dissect/models -> layers):\n" + \
        "\n".join(wrong)


def test_dissect_methods_build_on_shared_machinery_only():
    def room(module):
        parts = module.split(".")
        return parts[2] if parts[:2] == ["lwta_vision", "dissect"] and len(parts) > 2 else None

    wrong = []
    for a, b in _edges():
        ra, rb = room(a), room(b)
        if ra is None or rb is None or ra == rb:
            continue
        allowed = (SHARED if ra in SHARED else SHARED | {"evaluate"})
        if rb not in allowed:
            wrong.append(f"{a} -> {b}")
    assert not wrong, "a dissection method imports another method (or shared code imports a method):\n" + \
        "\n".join(sorted(wrong))


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def _all_modules_of(packages) -> list[str]:
    names = []
    for p in packages:
        pkg = __import__(f"lwta_vision.{p}", fromlist=["_"])
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
                  if not m.name.endswith("__main__")]
    return names


def test_torch_only_core_imports_no_lightning_or_wandb():
    modules = _all_modules_of(TORCH_ONLY)
    assert "lwta_vision.dissect.clip_dissect.encoding" in modules and len(modules) > 30
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "from lwta_vision.dissect.concepts import load_concept_set; load_concept_set('generated')\n"
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb')))")
    assert _run(code) == "[]"


def test_data_never_imports_dissection():
    modules = [m for m in _all_modules_of(["data"]) if not m.endswith(".shards")] + ["lwta_vision.data.shards"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "from lwta_vision.data.imagenet import imagenet_class_names; imagenet_class_names()\n"
            + "print(sorted(m for m in sys.modules if m.startswith(('lwta_vision.dissect', 'lwta_vision.lit', "
              "'lwta_vision.callbacks'))))")
    assert _run(code) == "[]"


def test_old_module_paths_still_import():
    """Configs' class_paths and user code written before the layout of one folder per method keep working."""
    from lwta_vision import _moved

    code = ("import warnings; warnings.simplefilter('ignore')\nimport importlib\n"
            f"print([importlib.import_module(m).__name__ for m in {list(_moved.MOVED)!r}])")
    assert _run(code) == str(list(_moved.MOVED.values()))
    # the import lines of the tests and benchmarks before the move
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from lwta_vision.dissect.scorers import CLIPScorer, GroundTruthScorer, WeightsUnavailableError\n"
            "from lwta_vision.dissect.engine import LayerLabels, NeuronRow, label_layer, label_drift, rank_concepts\n"
            "from lwta_vision.dissect.planted import PlantedUnit, planted_from_checkpoint\n"
            "from lwta_vision.dissect.pipeline import label_records, record_probe, write_report\n"
            "from lwta_vision.dissect.dnd import attention_boxes, box_iou, connected_components, rank_scores\n"
            "from lwta_vision.dissect.evaluate import default_sentence_model_path, evaluate_labels\n"
            "from lwta_vision.dissect.probe import ProbeSet\n"
            "import lwta_vision.dissect.clip_dissect as c\nprint(CLIPScorer is c.CLIPScorer)")
    assert _run(code) == "True"
    warned = subprocess.run([sys.executable, "-c", "import lwta_vision.dissect.scorers"], capture_output=True,
                            text=True, check=True).stderr
    assert "lwta_vision.dissect.scorers moved to lwta_vision.dissect.clip_dissect" in warned
