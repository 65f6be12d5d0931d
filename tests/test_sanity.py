"""Gradient-masking checks: they trip on a deliberately masked toy model and stay clear on its
unmasked twin; the pure judges apply their thresholds and slack as documented."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from paper_repro import config, sanity
from paper_repro.evaluate import Scorer

N, SHAPE, CLASSES = 40, (3, 16, 16), 10


class LinearToy(nn.Module):
    """A linear classifier; with ``levels`` it first rounds its input to that many steps per unit,
    whose gradient is exactly zero (white-box gradients vanish, the function stays non-robust)."""

    def __init__(self, weight: torch.Tensor, levels: int = 0):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.levels:
            x = torch.round(x * self.levels) / self.levels
        return x.flatten(1) @ self.weight.T


@pytest.fixture(scope="module")
def toys():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(CLASSES, SHAPE[0] * SHAPE[1] * SHAPE[2], generator=g)
    x_u8 = (torch.rand(N, *SHAPE, generator=g) * 255).round().to(torch.uint8)
    normal, masked = LinearToy(weight), LinearToy(weight, levels=4)
    y = normal(x_u8.float() / 255).argmax(dim=1)  # labels the unmasked model gets right
    return {"x": x_u8, "y": y, "normal": normal, "masked": masked}


def checks(model: nn.Module, toys: dict, twin: nn.Module | None) -> dict:
    ev = config.from_dict({"evaluate": {"sanity_steps": [5, 10, 20], "square_queries": 100}}).evaluate
    scorer = Scorer(model, torch.device("cpu"), batch_size=20)

    def score(attack, name):
        return 100.0 * float(scorer.correct(toys["x"], toys["y"], attack, ev.sanity_seed, name).mean())

    return sanity.run_checks(score, N, ev, twin, "the unmasked twin" if twin is not None else "no twin")


def test_flags_trip_on_a_gradient_masked_model(toys):
    flags = checks(toys["masked"], toys, twin=toys["normal"])
    for name in ("eps_sweep_to_zero", "blackbox_not_stronger", "transfer_not_stronger"):
        assert flags[name]["passed"] is False, (name, flags[name]["detail"])
        assert "masked" in flags[name]["detail"]
    assert flags["eps_sweep_to_zero"]["values"]["accuracy"][-1] > 2.0
    assert flags["blackbox_not_stronger"]["values"]["Square_accuracy"] < flags["blackbox_not_stronger"]["values"][
        "whitebox_accuracy"]


def test_flags_stay_clear_on_a_normal_model(toys):
    flags = checks(toys["normal"], toys, twin=None)
    assert {k: v["passed"] for k, v in flags.items()} == {
        "more_steps_not_weaker": True, "eps_sweep_to_zero": True, "blackbox_not_stronger": True,
        "transfer_not_stronger": None}
    assert flags["transfer_not_stronger"]["skipped"] and flags["transfer_not_stronger"]["detail"] == "no twin"
    assert flags["eps_sweep_to_zero"]["values"]["accuracy"][-1] == 0.0


def test_square_attack_is_seeded_and_leaves_the_global_rng_alone(toys):
    attack = sanity.square_fn(0.05, 30)
    x, y = toys["x"][:8].float() / 255, toys["y"][:8]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = attack(toys["normal"], x, y, torch.Generator(), 7)
    assert torch.equal(torch.get_rng_state(), before)
    b = attack(toys["normal"], x, y, torch.Generator(), 7)
    assert torch.equal(a, b) and (a - x).abs().max() <= 0.05 + 1e-6


# --------------------------------------------------------------------------- judges
def test_slack_is_tolerance_or_two_standard_errors():
    assert sanity.slack([0.0], 500, 1.0) == 1.0
    assert sanity.slack([50.0, 10.0], 100, 1.0) == pytest.approx(10.0)


def test_eps_sweep_judge():
    ok = sanity.judge_eps_sweep([0.03, 0.1, 1.0], [40.0, 5.0, 0.0], 1000, 2.0, 1.0, 50)
    assert ok["passed"] and ok["values"]["accuracy"] == [40.0, 5.0, 0.0]
    high = sanity.judge_eps_sweep([0.03, 0.1, 1.0], [40.0, 30.0, 12.0], 1000, 2.0, 1.0, 50)
    assert not high["passed"] and "stays at 12.00%" in high["detail"]
    rising = sanity.judge_eps_sweep([0.03, 0.1, 1.0], [10.0, 30.0, 0.0], 1000, 2.0, 1.0, 50)
    assert not rising["passed"] and "rises from eps 0.03 to 0.1" in rising["detail"]


def test_steps_and_comparison_judges():
    assert sanity.judge_steps([10, 50, 100], [40.0, 38.0, 38.5], 10000, 1.0, 0.031)["passed"]
    assert not sanity.judge_steps([10, 50, 100], [30.0, 38.0, 38.0], 10000, 1.0, 0.031)["passed"]
    assert sanity.judge_not_stronger("Square", 45.0, 40.0, 1000, 1.0, {})["passed"]
    assert not sanity.judge_not_stronger("Square", 20.0, 40.0, 1000, 1.0, {})["passed"]
    fgsm = {"mean": 50.0, "n": 10000}
    assert sanity.judge_single_step(fgsm, {"mean": 45.0, "n": 10000}, 1.0)["passed"]
    assert not sanity.judge_single_step(fgsm, {"mean": 60.0, "n": 10000}, 1.0)["passed"]
    assert sanity.judge_single_step(None, fgsm, 1.0)["passed"] is None


def test_levels_judge():
    rows = [{"name": "a", "levels": 3}, {"name": "b", "levels": 2}]
    assert sanity.judge_levels(rows, "ternary")["passed"]
    assert sanity.judge_levels(rows, "binary")["passed"]  # an exact zero adds a third value
    assert not sanity.judge_levels([{"name": "a", "levels": 40}], "4bit")["passed"]
    assert sanity.judge_levels([], "none")["passed"] is None
    assert not sanity.judge_levels([], "ternary")["passed"]
