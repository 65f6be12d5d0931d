"""`grid`'s plan (local executor): every profile's experiments get a cost and a job; the costliest train first."""
from __future__ import annotations

from pathlib import Path

import pytest

from paper_repro import config, grid

ROOT = Path(__file__).resolve().parents[1]
PROFILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*/params.yaml"))]


@pytest.mark.parametrize("path", PROFILES, ids=[str(p.relative_to(ROOT)) for p in PROFILES])
def test_every_profile_plans_a_train_and_an_evaluate_job_per_experiment(path: Path):
    """The paper profile's WideResNet and VGG runs (issue 16) once broke the ResNet-only cost formula."""
    settings = config.load(path)
    train, evaluate = grid.plan(settings, None, force=True)
    names = {e.name for e in settings.experiments}
    assert {j.experiment for j in train} == names == {j.experiment for j in evaluate}
    assert [j.cost for j in train] == sorted((j.cost for j in train), reverse=True)  # longest first


def cost(model: str, loss: str = "pgd_at") -> float:
    return grid.relative_cost(config.Experiment(name="x", model=model, loss=loss))


def test_costs_follow_size_ensemble_and_attack():
    assert cost("resnet20") == pytest.approx(4.0)            # PGD-AT: 4 ResNet20 passes per image
    assert cost("en5resnet20") == pytest.approx(5 * cost("resnet20"))
    assert cost("resnet56") > cost("resnet20") > cost("resnet20", "natural")
    assert 100 < cost("wrn34-10") / cost("resnet20") < 250  # 6.3 G vs 41 M MACs
    assert cost("en5wrn34-10") == pytest.approx(5 * cost("wrn34-10"))
    assert cost("resnet20") < cost("vgg11") < cost("vgg19")
