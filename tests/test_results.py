"""Every results section is measured on the defaults that ship: a changed default makes CI name what is stale.

Each ``results/<section>.json`` is written by a benchmark (``benchmarks/results.py``) with a stamp of the
settings that shape its figures (``lwta_vision.provenance.shaping_settings``: the LWTA noise and its draws, the
loader order, the concept CLIP's weights, the top-image rule, the held-out split, the tie tolerance, the config
files). When one of them changes, the figures describe networks or labels the code no longer produces.
"""
import inspect
import json
import re
import shutil
from pathlib import Path

from lwta_vision.layers import LWTA
from lwta_vision.provenance import shaping_settings, stale_settings

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = sorted((ROOT / "results").glob("*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def stale_report() -> list[str]:
    """One line per stale section: what changed and the command that measures it again."""
    lines = []
    for path in SECTIONS:
        section = _load(path)
        changed = stale_settings(section["stamp"])
        if changed:
            what = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            lines.append(f"results/{path.name} (RESULTS.md '{section['section']}') is stale ({what}); "
                         f"regenerate it with: {section['stamp']['command']}")
    return lines


def test_there_are_sections_and_each_is_written_by_the_results_helper():
    assert {p.stem for p in SECTIONS} >= {"quickstart", "planted"}
    text = (ROOT / "RESULTS.md").read_text()
    for path in SECTIONS:
        section = _load(path)
        assert section["section"] == path.stem and section["status"] == "current"
        stamp = section["stamp"]
        assert stamp["commit"] and "+uncommitted" not in stamp["commit"], "measure on committed code"
        block = re.search(rf"<!-- results:{path.stem} -->(.*?)<!-- /results:{path.stem} -->", text, re.S)
        assert block, f"RESULTS.md has no block for results/{path.name}"
        assert stamp["commit"][:12] in block[1] and stamp["command"] in block[1]


def test_every_section_was_measured_with_the_current_defaults():
    stale = stale_report()
    assert not stale, "\n".join(["figures measured with other defaults than the code's:"] + stale)


def _with_default(monkeypatch, cls, name, value):
    """Change the default of ``cls.__init__``'s argument ``name`` for the test (the real default, not a copy)."""
    init = cls.__init__
    params = [p for p in inspect.signature(init).parameters.values() if p.default is not inspect.Parameter.empty
              and p.kind is not inspect.Parameter.KEYWORD_ONLY]
    defaults = list(init.__defaults__)
    defaults[[p.name for p in params].index(name)] = value
    monkeypatch.setattr(init, "__defaults__", tuple(defaults))


def test_a_changed_noise_scale_default_makes_every_section_stale_and_names_the_command(monkeypatch):
    before = shaping_settings()["lwta.noise_scale"]
    _with_default(monkeypatch, LWTA, "noise_scale", before * 2)
    assert inspect.signature(LWTA).parameters["noise_scale"].default == before * 2  # the code's default moved
    stale = stale_report()
    assert len(stale) == len(SECTIONS)
    for line, path in zip(stale, SECTIONS):
        assert f"results/{path.name}" in line and f"lwta.noise_scale: {before!r} -> {before * 2!r}" in line
        assert "regenerate it with: python benchmarks/" in line


def test_a_changed_config_makes_its_sections_stale(tmp_path, monkeypatch):
    import lwta_vision.provenance as provenance

    copy = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", copy)
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert stale_report() == []  # an unchanged copy is not stale
    (copy / "quickstart.yaml").write_text((copy / "quickstart.yaml").read_text().replace("max_epochs: 8",
                                                                                         "max_epochs: 9"))
    stale = stale_report()
    assert any("results/quickstart.json" in line and "config.configs/quickstart.yaml" in line for line in stale)
    assert not any("results/planted.json" in line for line in stale)


def test_a_comment_in_a_config_does_not_make_it_stale(tmp_path, monkeypatch):
    import lwta_vision.provenance as provenance

    copy = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", copy)
    for path in copy.rglob("*.yaml"):
        path.write_text("# a new comment\n" + path.read_text())
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert stale_report() == []
