"""Releases known to be malicious can never be installed through our requirements (GHSA-w37p-236h-pfx3:
lightning and pytorch-lightning 2.6.2 and 2.6.3 ran credential-stealing code on import)."""
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
COMPROMISED = {"lightning": ("2.6.2", "2.6.3"), "pytorch-lightning": ("2.6.2", "2.6.3")}


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return [Requirement(s) for s in specs]


def admitted(requirements: list[Requirement]) -> list[str]:
    """`name==version` for every compromised release some requirement would accept."""
    bad = []
    for req in requirements:
        for version in COMPROMISED.get(req.name.lower().replace("_", "-"), ()):
            if req.specifier.contains(version, prereleases=True):
                bad.append(f"{req.name}=={version}")
    return bad


def test_the_check_catches_a_requirement_that_admits_a_compromised_release():
    assert admitted([Requirement("lightning>=2.4,<3")]) == ["lightning==2.6.2", "lightning==2.6.3"]
    assert admitted([Requirement("pytorch_lightning>=2.6,!=2.6.2")]) == ["pytorch_lightning==2.6.3"]
    assert admitted([Requirement("lightning>=2.4,<3,!=2.6.2,!=2.6.3")]) == []


def test_no_declared_requirement_admits_a_compromised_release():
    requirements = declared_requirements()
    names = {r.name.lower() for r in requirements}
    # both packages are named, so pip cannot pull pytorch-lightning in transitively at a compromised version
    assert {"lightning", "pytorch-lightning"} <= names
    assert admitted(requirements) == []


@pytest.mark.parametrize("dist", sorted(COMPROMISED))
def test_the_installed_release_is_not_a_compromised_one(dist):
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed")
    assert version not in COMPROMISED[dist], f"{dist} {version} is a compromised release: reinstall"
