"""``evaluate``: one trained run -> ``metrics/<run>.json`` (+ ``metrics/<run>.examples.npz``).

Everything is measured on the deployed weights (``runs/<run>/deployed.safetensors``: Q(W) for the
quantized tensors) in the model rebuilt from the sidecar's ``arch``/``arch_config``. The EnResNet is a
randomized defense (its noise stays on, as in the reference), so each accuracy is repeated over
``evaluate.seeds``: before every (attack, seed) the noise streams restart with ``model.seed_noise(seed)``
and the attack's own randomness comes from a ``torch.Generator`` seeded from (seed, attack); on one
device a re-run gives the same numbers. Spread: sample std over seeds and a 95% t-interval over seeds
(``ci95``; Wilson when one seed ran), plus the Wilson interval of the test-set sampling
(``ci95_wilson``). The schema is documented in docs/contracts.md ("metrics") and checked by
``validate_metrics`` before anything is written; files are written to a temp name and renamed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import atomic, attacks, checkpoint, config, sanity
from .config import ConfigError, EvalAttack, EvaluateSettings, Experiment, Settings
from .data import load_prepared, provenance
from .loader import pick_device
from .models import build
from .models.enresnet import derive_seed
from .train import RunPaths, channels_last_for, device_name

SCHEMA_VERSION = 1
PAPER_KEYS = ("natural", "fgsm", "ifgsm20", "cw_ref")
PAPER_COLUMNS = ("A1", "A2", "A3", "A4")
METHODS = ("BR", "BC", "none")
CI_LEVEL = 0.95
SUMMARY_BASE = ("run", "model", "quantizer", "method", "loss", "profile", "official")
SUMMARY_TAIL = ("sparsity_weight", "sparsity_channel", "size_compression", "n_examples", "n_seeds", "noise",
                "sanity_failed")
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
    jobs = [Job(key, spec, 0.0 if spec.attack == "natural" else spec.eps, False, n_main, tuple(ev.seeds))
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
                jobs.append(Job(key, spec, eps, True, n_audit, seeds))
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


# --------------------------------------------------------------------------- statistics
def wilson(p: float, n: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (fractions)."""
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + level / 2))
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_stats(correct: np.ndarray) -> dict[str, Any]:
    """Mean/std/CIs in % (2 decimals) from a (seeds, n) bool array."""
    from scipy.stats import t

    k, n = correct.shape
    counts = correct.sum(axis=1)
    pct = 100.0 * counts / n
    mean = float(pct.mean())
    lo_w, hi_w = wilson(mean / 100, n)
    if k >= 2:
        std = float(pct.std(ddof=1))
        half = float(t.ppf(0.5 + CI_LEVEL / 2, k - 1)) * std / math.sqrt(k)
        ci, method, std_out = (max(0.0, mean - half), min(100.0, mean + half)), "t over seeds", round(std, 2)
    else:
        ci, method, std_out = (100 * lo_w, 100 * hi_w), "wilson (one seed)", None
    return {"mean": round(mean, 2), "std": std_out, "ci95": [round(ci[0], 2), round(ci[1], 2)], "ci_method": method,
            "ci95_wilson": [round(100 * lo_w, 2), round(100 * hi_w, 2)],
            "per_seed": [round(float(p), 2) for p in pct], "correct": [int(c) for c in counts]}


# --------------------------------------------------------------------------- loading
def load_run(run_dir: Path, device: torch.device,
             channels_last: bool = False) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    """The deployed model (eval mode, on ``device``), its tensors (CPU) and sidecar."""
    path = RunPaths(Path(run_dir)).deployed
    tensors, sidecar = checkpoint.load(path, "cpu")
    if "arch" not in sidecar:
        raise checkpoint.CheckpointError(f"{checkpoint.sidecar_path(path)} has no 'arch': cannot rebuild the model")
    model = build(sidecar["arch"], **sidecar.get("arch_config", {}))
    checkpoint.load_into(model, path, tensors, sidecar)
    tensors = {name: tensors[name] for name in model.state_dict()}  # model order: reports repeat exactly
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, tensors, sidecar


def check_identity(experiment: Experiment, sidecar: Mapping[str, Any], run_dir: Path) -> None:
    """The run folder must hold what params.yaml says the experiment is."""
    expected = {"model": experiment.model, "quantizer": experiment.quantizer, "loss": experiment.loss}
    for key, value in expected.items():
        if sidecar.get(key, value) != value:
            raise ConfigError(f"experiments.{experiment.name}.{key} is {value!r} but {run_dir} was trained with "
                              f"{sidecar.get(key)!r}: retrain or evaluate the matching experiment")


def find_twin(settings: Settings, experiment: Experiment) -> Experiment | None:
    """The float twin: same model, loss, loss weights and noise, quantizer none."""
    for e in settings.experiments:
        if (e.name != experiment.name and not e.quantized and e.model == experiment.model and e.loss == experiment.loss
                and e.noise == experiment.noise and e.resolved_loss_params() == experiment.resolved_loss_params()):
            return e
    return None


def load_twin(settings: Settings, experiment: Experiment, run_dir: Path, device: torch.device,
              channels_last: bool = False) -> tuple[nn.Module | None, str]:
    """(twin model or None, a note: its name, or why there is none)."""
    if not experiment.quantized:
        return None, "This run is itself full precision; the transfer check applies to quantized runs."
    twin = find_twin(settings, experiment)
    if twin is None:
        return None, (f"No float twin in params.yaml (model {experiment.model}, loss {experiment.loss}, "
                      f"quantizer none).")
    twin_dir = Path(run_dir).parent / twin.name
    if not RunPaths(twin_dir).deployed.is_file():
        return None, f"The float twin {twin.name} has no trained run at {twin_dir}."
    model, _, _ = load_run(twin_dir, device, channels_last)
    return model, twin.name


# --------------------------------------------------------------------------- the evaluation
def evaluate_run(settings: Settings, experiment: Experiment, run_dir: Path, out_path: Path,
                 quiet: bool = False) -> dict[str, Any]:
    """Evaluate ``run_dir`` (deployed weights) and write ``out_path`` plus its examples file; returns the metrics."""
    started = time.perf_counter()
    ev = settings.evaluate
    check_settings(ev)
    run_dir, out_path = Path(run_dir), Path(out_path)
    device = pick_device(ev.device)
    channels_last = channels_last_for(device, settings)
    base, tensors, sidecar = load_run(run_dir, device, channels_last)
    check_identity(experiment, sidecar, run_dir)
    amp = ev.amp == "bf16" or (ev.amp == "auto" and device.type == "cuda")
    model = AutocastLogits(base, device.type) if amp else base
    data = load_prepared(settings.data.prepared)
    x_test, y_test = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test).long()
    noisy = noise_active(base)
    jobs, skipped_attacks = plan(ev, len(y_test), noisy)
    scorer = Scorer(model, device, ev.batch_size, quiet, channels_last)
    load_s = time.perf_counter() - started

    accuracy: dict[str, dict[str, Any]] = {}
    examples: dict[str, np.ndarray] = {}
    for job in jobs:
        entry, correct = run_job(scorer, job, x_test, y_test, noisy)
        accuracy[job.key], examples[job.key] = entry, correct

    sanity_start = time.perf_counter()
    flags = run_sanity(settings, experiment, run_dir, scorer, x_test, y_test, device, amp, accuracy)
    sanity_s = time.perf_counter() - sanity_start
    layers_doc, size_doc, packed = weights_report(ev, experiment.name, base, tensors, sidecar, out_path)
    flags["deployed_weights_quantized"] = sanity.judge_levels(
        layers_doc["layers"] if sidecar.get("quantized") else [], sidecar.get("quantizer", "none"),
        **(sidecar.get("quantizer_options") or {}))

    metrics = assemble(settings, experiment, run_dir, sidecar, data.meta, jobs, accuracy, skipped_attacks, flags,
                       layers_doc, size_doc, packed, device, out_path, noisy)
    metrics["timing"] = {"load_s": round(load_s, 2), "attacks_s": {k: v["seconds"] for k, v in accuracy.items()},
                         "sanity_s": round(sanity_s, 2), "total_s": round(time.perf_counter() - started, 2)}
    validate_metrics(metrics)
    write_examples(examples_path(out_path), examples, accuracy, y_test[:max((j.n for j in jobs), default=0)])
    write_json(out_path, metrics)
    return metrics


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


def run_sanity(settings: Settings, experiment: Experiment, run_dir: Path, scorer: Scorer, x_test: Tensor,
               y_test: Tensor, device: torch.device, amp: bool,
               accuracy: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gradient-masking checks (sanity.py) on the first ``sanity_examples`` test images, one seed."""
    ev = settings.evaluate
    flags: dict[str, dict[str, Any]] = {}
    if ev.sanity:
        n = min(ev.sanity_examples or len(y_test), len(y_test))
        x, y = x_test[:n], y_test[:n]
        twin, note = load_twin(settings, experiment, run_dir, device, scorer.channels_last)
        if twin is not None:
            twin = AutocastLogits(twin, device.type) if amp else twin
            twin.seed_noise(ev.sanity_seed)

        def score(attack: sanity.AttackFn, name: str) -> float:
            with tqdm(total=scorer.batches(n), desc=name, unit="batch", disable=scorer.quiet, leave=False) as bar:
                return 100.0 * float(scorer.correct(x, y, attack, ev.sanity_seed, name, bar=bar).mean())

        flags.update(sanity.run_checks(score, n, ev, twin, note))
    else:
        for name in ("more_steps_not_weaker", "eps_sweep_to_zero", "blackbox_not_stronger", "transfer_not_stronger"):
            flags[name] = sanity.skipped("evaluate.sanity is false.")
    flags["iterative_not_weaker"] = sanity.judge_single_step(accuracy.get("fgsm"), accuracy.get("ifgsm20"),
                                                             ev.sanity_tolerance)
    return flags


def weights_report(ev: EvaluateSettings, run: str, model: nn.Module, tensors: Mapping[str, Tensor],
                   sidecar: Mapping[str, Any], out_path: Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Sparsity (quant.summary) and size (quant.size_report) of the deployed tensors; optional packed export.

    Full-precision runs: sparsity over the tensors the reference rule WOULD quantize (measured exact
    zeros, normally 0) and size with nothing packed (compression 1.0).
    """
    from .quant import save_packed, select_quantized, size_report, summary

    quantized = list(sidecar.get("quantized") or [])
    scheme = sidecar.get("quantizer", "none")
    opts = dict(sidecar.get("quantizer_options") or {})
    names = quantized or select_quantized(model)
    doc = summary(tensors, names)
    doc = {**_rounded(doc), "selection": "quantized tensors" if quantized else
           "reference rule (3x3 convs incl. stem), not quantized in this run"}
    size = _rounded(size_report(tensors, quantized, None if not quantized else scheme, **opts))
    size["scheme"] = scheme
    packed = None
    if ev.export_packed and quantized:
        target = out_path.parent / "packed" / f"{run}.safetensors"
        save_packed(target, tensors, quantized, scheme, meta={"run": run, "arch": sidecar.get("arch")}, **opts)
        packed = str(target)
    return doc, size, packed


def _rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded (sparsity/size percentages and ratios), structure kept."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def assemble(settings: Settings, experiment: Experiment, run_dir: Path, sidecar: Mapping[str, Any],
             data_meta: Mapping[str, Any], jobs: Sequence[Job], accuracy: dict[str, Any],
             skipped_attacks: dict[str, str],
             flags: dict[str, Any], sparsity: dict[str, Any], size: dict[str, Any], packed: str | None,
             device: torch.device, out_path: Path, noisy: bool) -> dict[str, Any]:
    """The metrics document (docs/contracts.md, "metrics")."""
    import torchattacks

    ev = settings.evaluate
    train_profile = sidecar.get("profile", settings.profile)
    profile = settings.profile if settings.profile != "paper" or train_profile == "paper" else train_profile
    summary_path = RunPaths(run_dir).summary
    train_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    train_cfg = sidecar.get("train") or {}
    data_doc = provenance(dict(data_meta))
    trained_on = (sidecar.get("data") or {}).get("archive_md5")
    paper_eps = sorted({j.eps for j in jobs if not j.audit and j.eps > 0})
    audit_jobs = [j for j in jobs if j.audit]
    return {
        "schema_version": SCHEMA_VERSION, "run": experiment.name, "profile": profile,
        "model": sidecar.get("model", experiment.model), "quantizer": sidecar.get("quantizer", experiment.quantizer),
        "quantizer_options": dict(sidecar.get("quantizer_options") or {}),
        "method": sidecar.get("method", experiment.method if experiment.quantized else "none"),
        "loss": sidecar.get("loss", experiment.loss),
        "loss_params": dict(sidecar.get("loss_params") or experiment.resolved_loss_params()),
        "noise": bool(sidecar.get("noise", experiment.noise)),
        "noise_active": noisy,
        "n_examples": max((j.n for j in jobs if not j.audit), default=0), "n_requested": ev.n_examples,
        "seeds": list(ev.seeds),
        "eps": {"paper": paper_eps[0] if len(paper_eps) == 1 else paper_eps,
                "audit": list(ev.audit_eps) if audit_jobs else [],
                "audit_labels": [eps_label(e) for e in ev.audit_eps] if audit_jobs else [],
                "note": "0.031 is slightly below 8/255 = 0.03137"},
        "audit": {"enabled": ev.audit, "n_examples": audit_jobs[0].n if audit_jobs else 0,
                  "seeds": list(audit_jobs[0].seeds) if audit_jobs else []},
        "accuracy": accuracy,
        "skipped": skipped_attacks,
        "sanity": flags,
        "sparsity": sparsity,
        "size": size,
        "packed": packed,
        "data": {**data_doc, "n_eval": max((j.n for j in jobs), default=0),
                 "subset": "the first n images of the prepared test split",
                 "same_as_training": trained_on == data_doc.get("archive_md5") if trained_on else None},
        "provenance": {
            "epochs": train_summary.get("epochs", train_cfg.get("epochs")), "train_seed": train_cfg.get("seed"),
            "train_profile": train_profile, "selected": sidecar.get("selected"),
            "versions": sidecar.get("versions"), "device": sidecar.get("device"), "platform": sidecar.get("platform"),
            "wall_s": train_summary.get("wall_s"), "weights_sha256": sidecar.get("weights_sha256"),
            "deployed": str(RunPaths(run_dir).deployed),
            "eval_device": device_name(device), "eval_versions": {**checkpoint.versions(),
                                                                  "torchattacks": torchattacks.__version__,
                                                                  "numpy": np.__version__},
        },
        "examples": {"file": examples_path(out_path).name, "arrays": {k: npz_key(k) for k in accuracy},
                     "layout": "bool (len(seeds), n): correct after the attack; 'y' the labels, 'index' the "
                               "test-set indices"},
        "settings": config.to_dict(ev),
    }


# --------------------------------------------------------------------------- files
def examples_path(out_path: Path) -> Path:
    name = out_path.name[:-5] if out_path.name.endswith(".json") else out_path.name
    return out_path.with_name(f"{name}.examples.npz")


def npz_key(attack: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=+-]", "_", attack)


def write_examples(path: Path, examples: Mapping[str, np.ndarray], accuracy: Mapping[str, Mapping[str, Any]],
                   y: Tensor) -> None:
    """Per-example correctness, one bool (seeds, n) array per attack; loadable with allow_pickle=False."""
    arrays: dict[str, np.ndarray] = {"y": y.numpy().astype(np.int64), "index": np.arange(len(y), dtype=np.int64)}
    for key, correct in examples.items():
        arrays[npz_key(key)] = correct.astype(bool)
        arrays[f"{npz_key(key)}.seeds"] = np.asarray(accuracy[key]["seeds"], dtype=np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic.write_bytes(path, buffer.getvalue())


def write_json(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, indent=1)


# --------------------------------------------------------------------------- schema
def _fail(key: str, message: str) -> None:
    raise ValueError(f"metrics: {key} {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(m: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    full = f"{where}{key}"
    if not isinstance(m, Mapping) or key not in m:
        _fail(full, "is missing")
    value = m[key]
    if kind is float:
        if not _is_number(value):
            _fail(full, f"must be a number, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(full, f"must be an integer, got {value!r}")
    elif not isinstance(value, kind):
        _fail(full, f"must be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _validate_entry(key: str, e: Any) -> None:
    at = f"accuracy.{key}."
    if not isinstance(e, Mapping):
        _fail(f"accuracy.{key}", "must be a mapping")
    _require(e, "attack", str, at)
    _require(e, "eps", float, at)
    n = _require(e, "n", int, at)
    if n < 1:
        _fail(f"{at}n", f"must be >= 1, got {n}")
    mean = _require(e, "mean", float, at)
    if not 0 <= mean <= 100:
        _fail(f"{at}mean", f"must be a percentage in [0, 100], got {mean}")
    if e.get("std") is not None and not (_is_number(e["std"]) and e["std"] >= 0):
        _fail(f"{at}std", f"must be a number >= 0 or null, got {e.get('std')!r}")
    if "std" not in e:
        _fail(f"{at}std", "is missing")
    ci = e.get("ci95", "missing")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci)) and ci[0] <= ci[1]):
        _fail(f"{at}ci95", f"must be [low, high] or null, got {ci!r}")
    per_seed = _require(e, "per_seed", list, at)
    correct = _require(e, "correct", list, at)
    if not per_seed or len(per_seed) != len(correct):
        _fail(f"{at}correct", f"must list one count per seed ({len(per_seed)} per_seed values), got {len(correct)}")
    for p, c in zip(per_seed, correct):
        if not (_is_number(p) and isinstance(c, int) and 0 <= c <= n and abs(100.0 * c / n - p) <= 0.006):
            _fail(f"{at}per_seed", f"{p!r} does not match correct count {c!r} of n = {n}")
    if abs(sum(per_seed) / len(per_seed) - mean) > 0.02:
        _fail(f"{at}mean", f"{mean} is not the mean of per_seed {per_seed}")
    eot = _require(e, "eot", int, at)
    if eot < 1:
        _fail(f"{at}eot", f"must be >= 1, got {eot}")
    _require(e, "settings", Mapping, at)
    if "paper_column" in e and e["paper_column"] not in PAPER_COLUMNS:
        _fail(f"{at}paper_column", f"must be one of {PAPER_COLUMNS}, got {e['paper_column']!r}")


def validate_metrics(m: Any) -> None:
    """Raise ValueError naming the first key of ``m`` that breaks the metrics schema (docs/contracts.md).

    Checks the documented keys and their types; keys added later are allowed.
    """
    if not isinstance(m, Mapping):
        raise ValueError(f"metrics: the document must be a mapping, got {type(m).__name__}")
    if m.get("schema_version") != SCHEMA_VERSION:
        _fail("schema_version", f"must be {SCHEMA_VERSION}, got {m.get('schema_version')!r}")
    for key in ("run", "profile", "model", "loss"):
        _require(m, key, str)
    if _require(m, "quantizer", str) not in config.QUANTIZERS:
        _fail("quantizer", f"must be one of {config.QUANTIZERS}, got {m['quantizer']!r}")
    if _require(m, "method", str) not in METHODS:
        _fail("method", f"must be one of {METHODS}, got {m['method']!r}")
    if m["loss"] not in config.LOSSES:
        _fail("loss", f"must be one of {config.LOSSES}, got {m['loss']!r}")
    _require(m, "loss_params", Mapping)
    _require(m, "noise", bool)
    if _require(m, "n_examples", int) < 1:
        _fail("n_examples", f"must be >= 1, got {m['n_examples']}")
    seeds = _require(m, "seeds", list)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        _fail("seeds", f"must be a non-empty list of integers, got {seeds!r}")
    acc = _require(m, "accuracy", Mapping)
    if not acc:
        _fail("accuracy", "must hold at least one attack")
    for key, entry in acc.items():
        _validate_entry(key, entry)
    for key, flag_ in _require(m, "sanity", Mapping).items():
        if not isinstance(flag_, Mapping):
            _fail(f"sanity.{key}", "must be a mapping")
        if "passed" not in flag_ or not (flag_["passed"] is None or isinstance(flag_["passed"], bool)):
            _fail(f"sanity.{key}.passed", f"must be true, false or null (skipped), got {flag_.get('passed')!r}")
        _require(flag_, "detail", str, f"sanity.{key}.")
        _require(flag_, "values", Mapping, f"sanity.{key}.")
    sp = _require(m, "sparsity", Mapping)
    for key in ("weight", "channel", "filter", "model_weight"):
        if key not in sp or not (sp[key] is None or (_is_number(sp[key]) and 0 <= sp[key] <= 100)):
            _fail(f"sparsity.{key}", f"must be a percentage in [0, 100] or null, got {sp.get(key, 'missing')!r}")
    layers = _require(sp, "layers", list, "sparsity.")
    for i, row in enumerate(layers):
        if not isinstance(row, Mapping) or not isinstance(row.get("name"), str):
            _fail(f"sparsity.layers[{i}]", "must be a mapping with a name")
    size = _require(m, "size", Mapping)
    for key in ("bits_per_quantized_weight", "packed_bytes", "fp32_bytes", "compression"):
        if key not in size or not (size[key] is None or _is_number(size[key])):
            _fail(f"size.{key}", f"must be a number or null, got {size.get(key, 'missing')!r}")
    data = _require(m, "data", Mapping)
    _require(data, "official", bool, "data.")
    for key in ("archive_md5", "source", "n_train", "n_test"):
        if key not in data:
            _fail(f"data.{key}", "is missing")
    prov = _require(m, "provenance", Mapping)
    for key in ("epochs", "train_seed", "versions", "device", "wall_s"):
        if key not in prov:
            _fail(f"provenance.{key}", "is missing")


# --------------------------------------------------------------------------- summary.csv
def summary_row(m: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {k: m.get(k) for k in SUMMARY_BASE[:-1]}
    row["official"] = m["data"]["official"]
    for attack, entry in m["accuracy"].items():
        row[f"{attack}_mean"], row[f"{attack}_std"] = entry["mean"], entry.get("std")
    failed = sorted(k for k, v in m.get("sanity", {}).items() if v.get("passed") is False)
    row.update(sparsity_weight=m["sparsity"].get("weight"), sparsity_channel=m["sparsity"].get("channel"),
               size_compression=m["size"].get("compression"), n_examples=m["n_examples"], n_seeds=len(m["seeds"]),
               noise=m["noise"], sanity_failed=";".join(failed))
    return row


COMPACT_KEYS = ("natural_mean", "fgsm_mean", "ifgsm20_mean", "cw_ref_mean", "sparsity_weight", "sparsity_channel",
                "size_compression")


def compact(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """run -> the paper's columns, sparsity and compression: the small table `dvc metrics show` prints."""
    return {row["run"]: {k: row.get(k) for k in COMPACT_KEYS if row.get(k) is not None} for row in rows}


def summarize(metrics_dir: str | Path = "metrics", out: str | Path | None = None,
              json_out: str | Path | None = None) -> Path:
    """``out`` (default metrics/summary.csv): one row per metrics/<run>.json (validated), columns as
    docs/contracts.md; ``json_out``: the compact per-run table (`compact`) as JSON for DVC."""
    metrics_dir = Path(metrics_dir)
    docs = []
    for path in sorted(metrics_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or "schema_version" not in doc:
            continue  # not a metrics document
        try:
            validate_metrics(doc)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        docs.append(doc)
    rows = [summary_row(m) for m in docs]
    attacks_seen = list(dict.fromkeys([*(k for k in PAPER_KEYS if any(k in m["accuracy"] for m in docs)),
                                       *(k for m in docs for k in m["accuracy"])]))
    columns = [*SUMMARY_BASE, *(f"{a}_{s}" for a in attacks_seen for s in ("mean", "std")), *SUMMARY_TAIL]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out = Path(out) if out is not None else metrics_dir / "summary.csv"
    atomic.write_text(out, buffer.getvalue())
    if json_out is not None:
        atomic.write_json(json_out, compact(rows), indent=1, sort_keys=True)
    return out


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", help="name of an entry of params.yaml's experiments")
    p.add_argument("--run-dir", type=Path, help="trained run folder (default: runs/<experiment>)")
    p.add_argument("--out", type=Path, help="metrics file (default: metrics/<experiment>.json)")
    p.add_argument("--summary", action="store_true", help="write metrics/summary.csv from metrics/*.json instead")
    p.add_argument("--metrics-dir", type=Path, default=Path("metrics"), help="for --summary (default: metrics)")
    p.add_argument("--summary-out", type=Path, help="for --summary (default: <metrics-dir>/summary.csv)")
    p.add_argument("--summary-json", type=Path, help="for --summary: also write the compact per-run table as JSON")


def main(args: argparse.Namespace) -> int:
    if args.summary:
        print(f"wrote {summarize(args.metrics_dir, args.summary_out, args.summary_json)}")
        return 0
    if not args.experiment:
        raise ConfigError("evaluate needs --experiment NAME (or --summary)")
    settings = config.load(args.params, args.overrides)
    experiment = settings.experiment(args.experiment)
    run_dir = args.run_dir or Path("runs") / experiment.name
    out = args.out or Path("metrics") / f"{experiment.name}.json"
    try:
        metrics = evaluate_run(settings, experiment, run_dir, out, quiet=args.quiet)
    except checkpoint.CheckpointError as err:
        raise ConfigError(f"{err} (train it first: python -m paper_repro train -e {experiment.name})") from None
    for key, e in metrics["accuracy"].items():
        spread = f" +- {e['std']:.2f}" if e["std"] is not None else ""
        print(f"{key:>36}: {e['mean']:6.2f}%{spread} (n={e['n']}, {len(e['seeds'])} seeds, {e['seconds']:.1f}s)")
    failed = [k for k, v in metrics["sanity"].items() if v["passed"] is False]
    print(f"sanity: {'all passed' if not failed else 'FAILED ' + ', '.join(failed)}; "
          f"wrote {out} in {metrics['timing']['total_s']:.1f}s")
    return 0
