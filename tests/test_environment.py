"""The three dependency descriptions (pyproject ranges, lock pins, environment.yml) must agree."""
from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[norm(name)] = version
    return pins


def test_every_pyproject_dependency_is_pinned_inside_its_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = lock_pins()
    for dep in map(Requirement, deps):
        assert norm(dep.name) in pins, f"{dep.name} is in pyproject.toml but not pinned in requirements.lock"
        assert dep.specifier.contains(pins[norm(dep.name)]), \
            f"{dep.name}=={pins[norm(dep.name)]} (lock) is outside pyproject's range {dep.specifier}"


def test_environment_yml_matches_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = lock_pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = {}
    for line in pip_section:
        name, _, version = line.partition("==")
        assert version, f"environment.yml: {line!r} is not an exact pin"
        listed[norm(name)] = version
        assert pins.get(norm(name)) == version, f"environment.yml pins {line}, the lock pins {pins.get(norm(name))}"
    missing = {norm(Requirement(d).name) for d in deps} - set(listed)
    assert not missing, f"environment.yml lacks {sorted(missing)}"


def test_python_version_is_consistent():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.12"
    assert "3.11" in (ROOT / "requirements.lock").read_text().splitlines()[0]
