"""Every value in effect is in a tracked file (issue 12): the cpu profile lists every setting the code
has, so a default that changes in code cannot silently change its results; every profile loads."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from paper_repro import config

ROOT = Path(__file__).resolve().parents[1]
PROFILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*/params.yaml"))]


@pytest.mark.parametrize("path", PROFILES, ids=[str(p.relative_to(ROOT)) for p in PROFILES])
def test_every_profile_loads(path: Path):
    settings = config.load(path)
    assert settings.experiments, f"{path} lists no experiment"


def test_cpu_profile_lists_every_setting():
    raw = yaml.safe_load((ROOT / "profiles" / "cpu" / "params.yaml").read_text())
    hints = {"data": config.DataSettings, "train": config.TrainSettings, "evaluate": config.EvaluateSettings}
    missing = []
    for section, cls in hints.items():
        for f in dataclasses.fields(cls):
            if f.name not in raw[section]:
                missing.append(f"{section}.{f.name}")
    for name in ("pgd", "val_attack", "relax"):
        sub = {"pgd": config.AttackSettings, "val_attack": config.AttackSettings, "relax": config.RelaxSettings}[name]
        missing += [f"train.{name}.{f.name}" for f in dataclasses.fields(sub) if f.name not in raw["train"][name]]
    assert not missing, f"profiles/cpu/params.yaml relies on code defaults for {missing}: list them"
