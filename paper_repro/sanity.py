"""Gradient-masking sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness", section 5).

Why: a defense whose robustness comes from broken gradients (rounding, noise, saturation) looks robust
to white-box gradient attacks but not to attacks that need no gradient, nor to huge budgets. The EnResNet
is randomized and the deployed weights are quantized, so a reviewer asks exactly these questions:
- eps sweep: accuracy must fall to about 0 as eps grows (at the largest eps, <= ``sanity_zero_acc`` %);
- more PGD steps must never raise accuracy;
- the black-box Square attack must not beat white-box PGD;
- adversarial examples transferred from the float twin must not beat white-box ones;
- the single-step FGSM must not beat the iterative IFGSM20 (from the main results);
- the deployed quantized tensors hold no more distinct values than the quantizer allows.
Each check yields ``{"passed": bool, "detail": one sentence, "values": {...}}``; a check that could not
run has ``"passed": None, "skipped": True`` and says why. Accuracies are compared with a slack of
max(``sanity_tolerance`` points, two binomial standard errors), so the sampling noise of a randomized
model on a small subset raises no false alarm while masking (tens of points) does.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .attacks import eval_mode, pgd
from .config import EvaluateSettings

#: (model, x, y, generator, seed) -> adversarial x; the generator and seed belong to this attack run.
AttackFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator, int], Tensor]
#: (attack, cache name) -> accuracy in % of the scored model on the sanity subset.
Score = Callable[[AttackFn, str], float]

MADRY_STEP_FACTOR = 2.5  # PGD step = 2.5 * eps / steps (Madry et al.): the iterate can cross the ball


# --------------------------------------------------------------------------- flags
def flag(passed: bool, detail: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {"passed": bool(passed), "detail": detail, "values": dict(values)}


def skipped(reason: str, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"passed": None, "skipped": True, "detail": reason, "values": dict(values or {})}


def slack(accuracies: Sequence[float], n: int, tolerance: float) -> float:
    """Allowed excess in points: max(tolerance, 2 binomial standard errors at the largest accuracy)."""
    p = min(max(max(accuracies) / 100.0, 0.0), 1.0)
    return max(tolerance, 200.0 * math.sqrt(p * (1.0 - p) / max(n, 1)))


# --------------------------------------------------------------------------- judges (pure)
def judge_eps_sweep(eps: Sequence[float], acc: Sequence[float], n: int, zero_acc: float,
                    tolerance: float, steps: int) -> dict[str, Any]:
    """Accuracy falls (within slack) as eps grows and is <= zero_acc at the largest eps."""
    tol = slack(acc, n, tolerance)
    rises = [(eps[i], eps[i + 1]) for i in range(len(acc) - 1) if acc[i + 1] > acc[i] + tol]
    low = acc[-1] <= zero_acc
    values = {"eps": list(eps), "accuracy": [round(a, 2) for a in acc], "steps": steps,
              "threshold": zero_acc, "slack": round(tol, 2), "n": n}
    if low and not rises:
        return flag(True, f"PGD-{steps} accuracy falls to {acc[-1]:.2f}% at eps {eps[-1]:g} "
                          f"(threshold {zero_acc:g}%).", values)
    problems = []
    if not low:
        problems.append(f"stays at {acc[-1]:.2f}% > {zero_acc:g}% at eps {eps[-1]:g}")
    if rises:
        problems.append(f"rises from eps {rises[0][0]:g} to {rises[0][1]:g}")
    return flag(False, f"PGD-{steps} accuracy {' and '.join(problems)}: gradients may be masked.", values)


def judge_steps(steps: Sequence[int], acc: Sequence[float], n: int, tolerance: float,
                eps: float) -> dict[str, Any]:
    """More PGD steps never raise accuracy beyond the slack."""
    tol = slack(acc, n, tolerance)
    rises = [(steps[i], steps[i + 1]) for i in range(len(acc) - 1) if acc[i + 1] > acc[i] + tol]
    values = {"steps": list(steps), "accuracy": [round(a, 2) for a in acc], "eps": eps,
              "slack": round(tol, 2), "n": n}
    text = ", ".join(f"{s}: {a:.2f}%" for s, a in zip(steps, acc))
    if rises:
        return flag(False, f"PGD at eps {eps:g} gets weaker with more steps ({text}).", values)
    return flag(True, f"PGD at eps {eps:g} does not weaken with more steps ({text}).", values)


def judge_not_stronger(what: str, other_acc: float, white_acc: float, n: int, tolerance: float,
                       values: Mapping[str, Any]) -> dict[str, Any]:
    """``what`` (a weaker-by-design attack) must not reach lower accuracy than white-box PGD."""
    tol = slack([other_acc, white_acc], n, tolerance)
    values = {**values, f"{what}_accuracy": round(other_acc, 2), "whitebox_accuracy": round(white_acc, 2),
              "slack": round(tol, 2), "n": n}
    if other_acc < white_acc - tol:
        return flag(False, f"The {what} attack ({other_acc:.2f}%) is stronger than white-box PGD "
                           f"({white_acc:.2f}%): gradients may be masked.", values)
    return flag(True, f"The {what} attack ({other_acc:.2f}%) is not stronger than white-box PGD "
                      f"({white_acc:.2f}%).", values)


def judge_single_step(fgsm: Mapping[str, Any] | None, iterative: Mapping[str, Any] | None,
                      tolerance: float) -> dict[str, Any]:
    """FGSM (one step) must not beat IFGSM20 (20 steps); uses the main results' means."""
    if not fgsm or not iterative:
        return skipped("FGSM and IFGSM20 are not both among evaluate.attacks.")
    a, b, n = fgsm["mean"], iterative["mean"], min(fgsm["n"], iterative["n"])
    tol = slack([a, b], n, tolerance)
    values = {"fgsm": a, "ifgsm20": b, "slack": round(tol, 2), "n": n}
    if a < b - tol:
        return flag(False, f"Single-step FGSM ({a:.2f}%) beats iterative IFGSM20 ({b:.2f}%): "
                           f"gradients may be masked.", values)
    return flag(True, f"Iterative IFGSM20 ({b:.2f}%) is at least as strong as FGSM ({a:.2f}%).", values)


def judge_levels(layers: Sequence[Mapping[str, Any]], quantizer: str, **opts: Any) -> dict[str, Any]:
    """Each quantized tensor holds at most the quantizer's number of values (+ an exact 0 for binary)."""
    from .quant import levels

    if quantizer == "none":
        return skipped("Full-precision run: no quantized tensors to check.")
    if not layers:
        return flag(False, "The sidecar lists no quantized tensors for a quantized run.", {})
    limit = levels(quantizer, **opts) + (1 if quantizer == "binary" else 0)
    worst = max(layers, key=lambda r: r["levels"])
    values = {"max_levels": worst["levels"], "limit": limit, "layer": worst["name"], "layers": len(layers)}
    if worst["levels"] > limit:
        return flag(False, f"{worst['name']} holds {worst['levels']} distinct values, more than {quantizer} "
                           f"allows ({limit}): these are not the deployed quantized weights.", values)
    return flag(True, f"All {len(layers)} quantized tensors hold <= {limit} distinct values "
                      f"(max {worst['levels']}).", values)


# --------------------------------------------------------------------------- attacks
@contextlib.contextmanager
def standard_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily store a channels_last model's weights contiguously: torchattacks ``view``s input
    gradients, which fails on channels_last ones."""
    convs = [p for p in model.parameters() if p.dim() == 4 and not p.is_contiguous()]
    if not convs:
        yield model
        return
    model.to(memory_format=torch.contiguous_format)
    try:
        yield model
    finally:
        model.to(memory_format=torch.channels_last)


def pgd_fn(eps: float, steps: int, eot: int = 1) -> AttackFn:
    """PGD with a random start and step 2.5 eps / steps."""
    step = MADRY_STEP_FACTOR * eps / steps

    def attack(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator, seed: int) -> Tensor:
        return pgd(model, x, y, eps=eps, step=step, steps=steps, random_start=True, eot=eot, generator=generator)
    return attack


def square_fn(eps: float, queries: int) -> AttackFn:
    """torchattacks.Square (black-box, margin loss) with explicit settings; its global-RNG use is seeded
    and the caller's RNG state restored."""
    def attack(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator, seed: int) -> Tensor:
        import torchattacks

        devices = [x.device.index or 0] if x.is_cuda else []
        with eval_mode(model), standard_layout(model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed % 2**31)
            square = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=queries, n_restarts=1,
                                         p_init=0.8, loss="margin", resc_schedule=True, seed=seed % 2**31,
                                         verbose=False)
            return square(x.detach().contiguous(), y).detach()
    return attack


def transfer_fn(source: nn.Module, eps: float, steps: int, eot: int = 1) -> AttackFn:
    """PGD crafted on ``source`` (the float twin), applied to whatever model is scored."""
    craft = pgd_fn(eps, steps, eot)

    def attack(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator, seed: int) -> Tensor:
        return craft(source, x, y, generator, seed)
    return attack


# --------------------------------------------------------------------------- the checks
def run_checks(score: Score, n: int, ev: EvaluateSettings, twin: nn.Module | None,
               twin_note: str) -> dict[str, dict[str, Any]]:
    """The attack-based checks on the sanity subset; ``twin`` None skips the transfer check (``twin_note`` says why)."""
    cache: dict[tuple[float, int], float] = {}

    def pgd_acc(eps: float, steps: int) -> float:
        if (eps, steps) not in cache:
            cache[(eps, steps)] = score(pgd_fn(eps, steps, ev.sanity_eot), f"sanity_pgd{steps}@{eps:g}")
        return cache[(eps, steps)]

    eps0, most = ev.sanity_eps[0], max(ev.sanity_steps)
    tol = ev.sanity_tolerance
    flags = {
        "more_steps_not_weaker": judge_steps(ev.sanity_steps, [pgd_acc(eps0, s) for s in ev.sanity_steps], n, tol,
                                             eps0),
        "eps_sweep_to_zero": judge_eps_sweep(ev.sanity_eps, [pgd_acc(e, most) for e in ev.sanity_eps], n,
                                             ev.sanity_zero_acc, tol, most),
    }
    white = pgd_acc(eps0, most)
    square = score(square_fn(eps0, ev.square_queries), f"sanity_square@{eps0:g}")
    flags["blackbox_not_stronger"] = judge_not_stronger(
        "Square", square, white, n, tol, {"eps": eps0, "queries": ev.square_queries, "pgd_steps": most})
    if twin is None:
        flags["transfer_not_stronger"] = skipped(twin_note)
    else:
        transfer = score(transfer_fn(twin, eps0, most, ev.sanity_eot), f"sanity_transfer@{eps0:g}")
        flags["transfer_not_stronger"] = judge_not_stronger(
            "transfer", transfer, white, n, tol, {"eps": eps0, "pgd_steps": most, "source": twin_note})
    return flags
