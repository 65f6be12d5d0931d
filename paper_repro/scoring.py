"""Attacking a model and counting: the evaluation's jobs (attack x eps x images x seeds), each attack as a
seeded callable, and the batched scorer that records per-example correctness.

Why a module of its own: ``evaluate`` (the stage) and ``gpu-check`` (timing the paper columns) run the same
jobs the same way; the statistics of the counts are ``stats.accuracy_stats``. Before every (attack, seed)
the noise streams restart with ``model.seed_noise(seed)`` and the attack's own randomness comes from a
``torch.Generator`` seeded from (seed, attack), so a re-run on one device gives the same numbers.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import attacks, sanity
from .config import ConfigError, EvalAttack, EvaluateSettings
from .models.enresnet import derive_seed
from .stats import accuracy_stats

#: Label used when an attack entry gives none (cw_ref must always say it is the reference variant).
FUNCTION_LABELS = {
    "natural": "natural (clean) accuracy", "fgsm": "FGSM", "ifgsm20": "IFGSM20", "pgd": "PGD",
    "cw_ref": "C&W, the reference variant (not standard Carlini-Wagner; unclamped)", "cw_linf": "CW-Linf",
    "autoattack": "AutoAttack (torchattacks)",
}
TORCHATTACKS_SEED_MOD = 2**31  # torchattacks' sub-attacks call torch.manual_seed with their seed
TORCHATTACKS_BASED = ("autoattack",)  # need contiguous tensors (see sanity.standard_layout)


# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Job:
    """One accuracy to measure: an attack at one eps on the first ``n`` test images for each seed."""
    key: str
    spec: EvalAttack
    eps: float
    audit: bool
    n: int
    seeds: tuple[int, ...]


def eps_label(eps: float) -> str:
    """'8/255' for multiples of 1/255 below 1, else the plain number ('0.031', '1')."""
    k = eps * 255
    return f"{round(k)}/255" if 1 <= round(k) < 255 and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def plan(ev: EvaluateSettings, n_available: int, noisy: bool) -> tuple[list[Job], dict[str, str]]:
    """The jobs of one evaluation and the attacks skipped (key -> reason)."""
    n_main = min(ev.n_examples or n_available, n_available)
    jobs = [Job(key, spec, 0.0 if spec.attack == "natural" else spec.eps, False,
                min(spec.n_examples or n_main, n_available), tuple(ev.seeds))
            for key, spec in ev.attacks.items()]
    skipped: dict[str, str] = {}
    if not ev.audit:
        return jobs, skipped
    n_audit = min(ev.audit_examples or n_main, n_main)
    seeds = tuple(ev.audit_seeds or ev.seeds)
    for name, spec in ev.audit_attacks.items():
        for eps in ev.audit_eps:
            key = f"{name}@{eps_label(eps)}"
            if spec.noisy_only and not noisy:
                skipped[key] = "the model has no active noise; this attack is for randomized models"
            else:
                jobs.append(Job(key, spec, eps, True, min(spec.n_examples or n_audit, n_main), seeds))
    return jobs, skipped


def check_settings(ev: EvaluateSettings) -> None:
    """Attack options must be parameters of the attack function (fails before any work, naming the key)."""
    for group, specs in (("attacks", ev.attacks), ("audit_attacks", ev.audit_attacks)):
        for name, spec in specs.items():
            if spec.attack == "natural":
                if spec.options:
                    raise ConfigError(f"evaluate.{group}.{name}.options: natural accuracy takes no options")
                continue
            params = inspect.signature(attacks.ATTACKS[spec.attack]).parameters
            allowed = sorted(set(params) - {"model", "x", "y", "eps", "eot", "generator", "seed", "verbose"})
            for key in spec.options:
                if key not in allowed:
                    raise ConfigError(f"evaluate.{group}.{name}.options.{key} is not a parameter of "
                                      f"attacks.{spec.attack} (allowed: {', '.join(allowed)})")
            if spec.eot > 1 and "eot" not in params:
                raise ConfigError(f"evaluate.{group}.{name}.eot: attacks.{spec.attack} has no eot setting")


# --------------------------------------------------------------------------- attacks as callables
def make_attack(spec: EvalAttack, eps: float, eot: int) -> sanity.AttackFn:
    """(model, x, y, generator, seed) -> x_adv for one configured attack."""
    if spec.attack == "natural":
        return lambda model, x, y, generator, seed: x
    fn = attacks.ATTACKS[spec.attack]
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {**spec.options, "eps": eps}
    if "eot" in params:
        kwargs["eot"] = eot

    def attack(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator, seed: int) -> Tensor:
        extra: dict[str, Any] = {}
        if "generator" in params:
            extra["generator"] = generator
        if "seed" in params:
            extra["seed"] = seed % TORCHATTACKS_SEED_MOD
        if spec.attack in TORCHATTACKS_BASED:
            with sanity.standard_layout(model):
                return fn(model, x.contiguous(), y, **kwargs, **extra)
        return fn(model, x, y, **kwargs, **extra)
    return attack


class AutocastLogits(nn.Module):
    """Runs the model under bf16 autocast and returns fp32 logits (CUDA only), so every attack,
    torchattacks' included, sees fp32 outputs; the noise controls are passed through."""

    def __init__(self, model: nn.Module, device_type: str):
        super().__init__()
        self.inner = model
        self.device_type = device_type

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.inner(x).float()

    @property
    def has_noise(self) -> bool:
        return bool(getattr(self.inner, "has_noise", False))

    @property
    def noise_enabled(self) -> bool:
        return bool(getattr(self.inner, "noise_enabled", False))

    @property
    def noise_std(self) -> str | None:
        return getattr(self.inner, "noise_std", None)

    def set_noise(self, enabled: bool) -> "AutocastLogits":
        self.inner.set_noise(enabled)
        return self

    def set_noise_std(self, mode: str) -> "AutocastLogits":
        self.inner.set_noise_std(mode)
        return self

    def seed_noise(self, seed: int) -> "AutocastLogits":
        self.inner.seed_noise(seed)
        return self


@contextlib.contextmanager
def noise_switched(model: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Temporarily switch a noisy model's noise on/off (no-op for models without noise)."""
    if not getattr(model, "has_noise", False) or model.noise_enabled == enabled:
        yield model
        return
    before = model.noise_enabled
    model.set_noise(enabled)
    try:
        yield model
    finally:
        model.set_noise(before)


def noise_active(model: nn.Module) -> bool:
    return bool(getattr(model, "has_noise", False) and model.noise_enabled)


@dataclass(frozen=True)
class Scorer:
    """Batched per-example correctness of a model under an attack, seeded per (seed, attack)."""
    model: nn.Module
    device: torch.device
    batch_size: int
    quiet: bool = True
    channels_last: bool = False

    def correct(self, x_u8: Tensor, y: Tensor, attack: sanity.AttackFn, seed: int, name: str, *,
                noise: bool = True, model: nn.Module | None = None, bar: tqdm | None = None) -> np.ndarray:
        """Bool array: image i is still classified correctly after the attack (one seed)."""
        model = self.model if model is None else model
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(seed, "attack", name))
        if hasattr(model, "seed_noise"):
            model.seed_noise(seed)
        out = []
        with noise_switched(model, noise), attacks.eval_mode(model):
            for start in range(0, y.numel(), self.batch_size):
                x = x_u8[start:start + self.batch_size].to(self.device).float().div_(255)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yb = y[start:start + self.batch_size].to(self.device)
                x_adv = attack(model, x, yb, generator, derive_seed(seed, "attack", name, start))
                with torch.no_grad():
                    out.append((model(x_adv).argmax(dim=1) == yb).cpu())
                if bar is not None:
                    bar.update(1)
        return torch.cat(out).numpy()

    def batches(self, n: int) -> int:
        return -(-n // self.batch_size)


# --------------------------------------------------------------------------- one job
def run_job(scorer: Scorer, job: Job, x_test: Tensor, y_test: Tensor,
            noisy: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Per-seed correctness of one job and its accuracy entry."""
    spec = job.spec
    eot = spec.eot if noisy and spec.noise else 1  # EOT over a deterministic model only repeats work
    attack = make_attack(spec, job.eps, eot)
    x, y = x_test[:job.n], y_test[:job.n]
    start = time.perf_counter()
    with tqdm(total=len(job.seeds) * scorer.batches(job.n), desc=job.key, unit="batch", disable=scorer.quiet,
              leave=False) as bar:
        rows = [scorer.correct(x, y, attack, seed, job.key, noise=spec.noise, bar=bar) for seed in job.seeds]
    correct = np.stack(rows)
    entry = {"attack": job.key, "function": spec.attack, "label": spec.label or FUNCTION_LABELS[spec.attack],
             "eps": job.eps, "eps_label": eps_label(job.eps) if job.eps else "0", "n": job.n, "seeds": list(job.seeds),
             **accuracy_stats(correct), "eot": eot, "noise": bool(noisy and spec.noise), "audit": job.audit,
             "settings": {"function": spec.attack, "options": dict(spec.options), "eot": spec.eot,
                          "noise": spec.noise, "noisy_only": spec.noisy_only},
             "seconds": round(time.perf_counter() - start, 2)}
    if spec.paper_column:
        entry["paper_column"] = spec.paper_column
    return entry, correct
