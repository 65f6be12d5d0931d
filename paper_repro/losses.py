"""Training objectives: natural, PGD adversarial training, the paper's trade-off loss, TRADES.

Each objective says whether it needs adversarial examples and makes them itself, so the training loop
has one code path: ``x_adv = objective.adversarial(...)`` then ``objective.loss(...)``.
The trade-off loss (authors' code, "Loss (9)"): L = w_adv * CE(f(x_adv), y) + w_nat * CE(f(x), y),
paper code w_adv = 8, w_nat = 1. Clean and adversarial batches go through separate forward passes, as in
the reference, so batch-norm statistics and the batch-wide noise std are never mixed between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attacks
from .config import AttackSettings, Experiment

TRADES_INIT_SCALE = 0.001  # TRADES starts its KL attack from x + 0.001 * N(0, I)


@dataclass(frozen=True)
class Objective:
    kind: str
    params: dict[str, float]
    attack: AttackSettings

    @property
    def needs_adversarial(self) -> bool:
        return self.kind != "natural"

    def adversarial(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None) -> Tensor | None:
        """Adversarial inputs against the current (relaxed/quantized) weights, model in eval mode."""
        a = self.attack
        if self.kind in ("pgd_at", "tradeoff"):
            return attacks.pgd(model, x, y, eps=a.eps, step=a.step, steps=a.steps,
                               random_start=a.random_start, generator=generator)
        if self.kind == "trades":
            return trades_attack(model, x, eps=a.eps, step=a.step, steps=a.steps, generator=generator)
        return None

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor | None) -> tuple[Tensor, Tensor]:
        """(scalar loss, logits used for the running training accuracy)."""
        if self.kind == "natural":
            logits = model(x)
            return F.cross_entropy(logits.float(), y), logits
        assert x_adv is not None
        if self.kind == "pgd_at":
            logits = model(x_adv)
            return F.cross_entropy(logits.float(), y), logits
        if self.kind == "tradeoff":
            adv_logits = model(x_adv)
            nat_logits = model(x)
            value = (self.params["w_adv"] * F.cross_entropy(adv_logits.float(), y)
                     + self.params["w_nat"] * F.cross_entropy(nat_logits.float(), y))
            return value, adv_logits
        if self.kind == "trades":
            nat_logits = model(x)
            adv_logits = model(x_adv)
            kl = F.kl_div(F.log_softmax(adv_logits.float(), 1), F.softmax(nat_logits.float(), 1),
                          reduction="batchmean")
            return F.cross_entropy(nat_logits.float(), y) + self.params["beta"] * kl, adv_logits
        raise ValueError(f"unknown loss {self.kind!r}")


def objective_for(experiment: Experiment, attack: AttackSettings) -> Objective:
    return Objective(experiment.loss, experiment.resolved_loss_params(), attack)


def trades_attack(model: nn.Module, x: Tensor, eps: float, step: float, steps: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """TRADES inner maximisation: sign-gradient ascent on KL(f(x') || f(x)) inside the eps-ball."""
    with attacks.attack_mode(model), torch.no_grad():
        target = F.softmax(model(x).float(), 1)
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_adv = (x + TRADES_INIT_SCALE * noise).clamp(0, 1)
    with attacks.attack_mode(model):
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                kl = F.kl_div(F.log_softmax(model(x_adv).float(), 1), target, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
