"""The claims registry (claims.yaml): loading, validation, resolving a claim's number in the
metrics, and the qualitative claims C1-C7 as checks over the metrics.

Why here: every number the reproduction is judged against lives in one reviewed YAML file, and
the rules that turn metrics into verdicts live next to it, so that a verdict can always be traced
to a registry entry and to the metrics fields it read. `python -m paper_repro.claims` validates
the registry (use it after editing claims.yaml).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

REGISTRY_PATH = Path(__file__).with_name("claims.yaml")

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_RUN = "not run"
NOT_COMPARABLE = "not comparable"
PENDING = "pending"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_RUN, NOT_COMPARABLE, PENDING)

DATASETS = ("cifar10", "cifar100", "svhn")
NUMERIC_REQUIRED = ("id", "source", "citation", "table", "row", "column", "dataset", "value",
                    "tolerance", "maps_to")
NUMERIC_OPTIONAL = ("note",)
MAPS_TO_KEYS = ("run", "select", "metric")
SELECT_FIELDS = ("model", "quantizer", "method", "loss", "noise", "loss_params")
QUALITATIVE_REQUIRED = ("id", "claim", "check", "params")
QUALITATIVE_OPTIONAL = ("note",)
# A value taken from the paper itself must say where it is printed.
PAPER_SOURCE = "paper"
PAGE_OR_TABLE = re.compile(r"\b(p\.|pp\.|page|table|tab\.)\s*\S", re.IGNORECASE)
SMALL_WEIGHT_THRESHOLD = 1e-3
# Channel sparsity etc. are only meaningful for quantized runs; float runs say quantizer "none".
FLOAT = "none"


class RegistryError(ValueError):
    """claims.yaml is malformed; the message lists every problem found."""


@dataclass(frozen=True)
class MapsTo:
    """Where a reported number is measured: which run (by metrics fields) and which metric."""

    run: str
    metric: str
    select: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NumericClaim:
    """One reported number; `value is None` means pending (not yet read from its source)."""

    id: str
    source: str
    citation: str | None
    table: str
    row: str
    column: str
    dataset: str
    value: float | None
    tolerance: float
    maps_to: MapsTo | None
    note: str | None = None

    @property
    def pending(self) -> bool:
        return self.value is None

    @property
    def label(self) -> str:
        return f"{self.row} / {self.column} ({self.dataset})"


@dataclass(frozen=True)
class QualitativeClaim:
    """A statement of the paper checked by a function of CHECKS over all metrics."""

    id: str
    claim: str
    check: str
    params: Mapping[str, Any]
    note: str | None = None


@dataclass(frozen=True)
class Registry:
    sources: Mapping[str, Mapping[str, Any]]
    numeric: tuple[NumericClaim, ...]
    qualitative: tuple[QualitativeClaim, ...]
    path: str = ""


@dataclass(frozen=True)
class Measurement:
    """A reproduced number with its spread over evaluation seeds (None where unknown)."""

    mean: float
    std: float | None = None
    ci95: tuple[float, float] | None = None
    n_seeds: int | None = None


@dataclass
class CheckResult:
    """Outcome of a qualitative check before comparability is applied."""

    holds: bool | None  # None: nothing to compare (not run)
    detail: str
    evidence: list[dict[str, Any]] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------

def load_registry(path: str | Path | None = None) -> Registry:
    """Read and validate claims.yaml (the packaged one by default)."""
    path = Path(path) if path is not None else REGISTRY_PATH
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
    return validate(raw, where=str(path))


def validate(raw: Any, where: str = "claims.yaml") -> Registry:
    """Turn parsed YAML into a Registry, or raise RegistryError listing every problem."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: top level must be a mapping with sources, qualitative, numeric")
    unknown = set(raw) - {"schema_version", "sources", "qualitative", "numeric"}
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)}")
    sources = raw.get("sources") or {}
    if not isinstance(sources, dict):
        problems.append("sources must be a mapping of source id -> {title, ref}")
        sources = {}
    numeric = [_numeric(e, i, sources, problems) for i, e in enumerate(raw.get("numeric") or [])]
    qualitative = [_qualitative(e, i, problems) for i, e in enumerate(raw.get("qualitative") or [])]
    ids = [c.id for c in numeric + qualitative if c is not None]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        problems.append(f"duplicate ids {dupes}")
    if problems:
        raise RegistryError(f"{where}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return Registry(sources=sources, numeric=tuple(numeric), qualitative=tuple(qualitative), path=where)


def _keys_problems(entry: dict, name: str, required: Sequence[str], optional: Sequence[str]) -> list[str]:
    out = []
    missing = [k for k in required if k not in entry]
    if missing:
        out.append(f"{name}: missing field(s) {missing}")
    unknown = sorted(set(entry) - set(required) - set(optional))
    if unknown:
        out.append(f"{name}: unknown field(s) {unknown} (allowed: {list(required) + list(optional)}; "
                   "verdicts are computed by verify, never written in the registry)")
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _numeric(entry: Any, index: int, sources: Mapping[str, Any], problems: list[str]) -> NumericClaim | None:
    if not isinstance(entry, dict):
        problems.append(f"numeric[{index}]: must be a mapping")
        return None
    name = f"numeric entry {entry.get('id', f'#{index}')!r}"
    own = _keys_problems(entry, name, NUMERIC_REQUIRED, NUMERIC_OPTIONAL)
    value, tol, citation = entry.get("value"), entry.get("tolerance"), entry.get("citation")
    if "source" in entry and entry["source"] not in sources:
        own.append(f"{name}: source {entry['source']!r} is not one of sources {sorted(sources)}")
    if "dataset" in entry and entry["dataset"] not in DATASETS:
        own.append(f"{name}: dataset {entry['dataset']!r} is not one of {list(DATASETS)}")
    if value is not None and not _is_number(value):
        own.append(f"{name}: value must be a number or null (pending), got {value!r}")
    if "tolerance" in entry and not (_is_number(tol) and tol >= 0):
        own.append(f"{name}: tolerance must be a number >= 0 (percentage points), got {tol!r}")
    if value is not None and not (isinstance(citation, str) and citation.strip()):
        own.append(f"{name}: value {value!r} given without a citation; add where it is printed, "
                   "e.g. citation: \"p. 9, Table 2\"")
    elif (value is not None and entry.get("source") == PAPER_SOURCE
          and not PAGE_OR_TABLE.search(str(citation))):
        own.append(f"{name}: a value from the paper needs a page or table in its citation "
                   f"(e.g. \"p. 9, Table 2\"), got {citation!r}")
    maps_to = _maps_to(entry.get("maps_to"), name, own)
    problems.extend(own)
    if own:
        return None
    return NumericClaim(id=str(entry["id"]), source=entry["source"], citation=citation,
                        table=str(entry["table"]), row=str(entry["row"]), column=str(entry["column"]),
                        dataset=entry["dataset"], value=None if value is None else float(value),
                        tolerance=float(tol), maps_to=maps_to, note=entry.get("note"))


def _maps_to(raw: Any, name: str, problems: list[str]) -> MapsTo | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{name}: maps_to must be null or a mapping {{run, select, metric}}")
        return None
    problems.extend(_keys_problems(raw, f"{name} maps_to", ("run", "metric"), ("select",)))
    select = raw.get("select") or {}
    if not isinstance(select, dict):
        problems.append(f"{name}: maps_to.select must be a mapping of metrics fields")
        select = {}
    bad = sorted(set(select) - set(SELECT_FIELDS))
    if bad:
        problems.append(f"{name}: maps_to.select has unknown field(s) {bad} (allowed: {list(SELECT_FIELDS)})")
    if "run" not in raw or "metric" not in raw:
        return None
    return MapsTo(run=str(raw["run"]), metric=str(raw["metric"]), select=dict(select))


def _qualitative(entry: Any, index: int, problems: list[str]) -> QualitativeClaim | None:
    if not isinstance(entry, dict):
        problems.append(f"qualitative[{index}]: must be a mapping")
        return None
    name = f"qualitative entry {entry.get('id', f'#{index}')!r}"
    own = _keys_problems(entry, name, QUALITATIVE_REQUIRED, QUALITATIVE_OPTIONAL)
    check, params = entry.get("check"), entry.get("params")
    if "check" in entry and check not in CHECKS:
        own.append(f"{name}: check {check!r} is not one of {sorted(CHECKS)}")
    elif "params" in entry:
        if not isinstance(params, dict):
            own.append(f"{name}: params must be a mapping")
        else:
            import inspect

            accepted = set(inspect.signature(CHECKS[check]).parameters) - {"metrics"}
            extra = sorted(set(params) - accepted)
            if extra:
                own.append(f"{name}: params {extra} not accepted by check {check!r} (accepts {sorted(accepted)})")
    problems.extend(own)
    if own:
        return None
    return QualitativeClaim(id=str(entry["id"]), claim=str(entry["claim"]), check=check,
                            params=dict(params), note=entry.get("note"))


# --------------------------------------------------------------------------------------------
# Reading metrics
# --------------------------------------------------------------------------------------------

def load_metrics(metrics_dir: str | Path) -> list[dict[str, Any]]:
    """All metrics/<run>.json documents (dicts with 'model' and 'accuracy'), sorted by run name;
    a missing folder gives []."""
    folder = Path(metrics_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "accuracy" in data and "model" in data:  # skip other JSON files
            data.setdefault("run", path.stem)
            out.append(data)
    return sorted(out, key=lambda m: m["run"])


def is_official(m: Mapping[str, Any]) -> bool:
    return bool((m.get("data") or {}).get("official", False))


def is_comparable(m: Mapping[str, Any]) -> bool:
    """Comparable with the paper: official CIFAR-10 data and the full 'paper' profile."""
    return is_official(m) and m.get("profile") == "paper"


def get_path(d: Any, path: str) -> Any:
    """Value at a dotted path; keys may themselves contain dots (e.g. 'pgd50_eot@0.031')."""
    if path == "":
        return d
    if not isinstance(d, Mapping):
        return None
    if path in d:
        return d[path]
    for key in sorted(d, key=lambda k: -len(str(k))):
        if path.startswith(f"{key}."):
            found = get_path(d[key], path[len(str(key)) + 1:])
            if found is not None:
                return found
    return None


def norm(field_name: str, value: Any) -> Any:
    """Normalise a metrics field for matching (method case, 'fp' as an alias of 'none')."""
    if isinstance(value, str):
        value = value.lower()
        if field_name == "quantizer" and value == "fp":
            return FLOAT
    return value


def matches(m: Mapping[str, Any], select: Mapping[str, Any]) -> bool:
    for key, want in select.items():
        have = m.get(key)
        if isinstance(want, Mapping):
            if not isinstance(have, Mapping) or any(have.get(k) != v for k, v in want.items()):
                return False
        elif norm(key, have) != norm(key, want):
            return False
    return True


def find_runs(metrics: Iterable[Mapping[str, Any]], maps_to: MapsTo) -> list[Mapping[str, Any]]:
    """Runs that match maps_to.select (by metrics fields); the named run first. Without a select,
    the run is found by name."""
    metrics = list(metrics)
    if maps_to.select:
        found = [m for m in metrics if matches(m, maps_to.select)]
    else:
        found = [m for m in metrics if m.get("run") == maps_to.run]
    return sorted(found, key=lambda m: (m.get("run") != maps_to.run, m.get("run", "")))


def small_weight_share(runs_dir: str | Path | None, run: str,
                       threshold: float = SMALL_WEIGHT_THRESHOLD) -> float | None:
    """% of float conv weights (4-D tensors of runs/<run>/float.safetensors) with |w| < threshold."""
    if runs_dir is None:
        return None
    path = Path(runs_dir) / run / "float.safetensors"
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    import numpy as np

    kernels = [t for t in load_file(str(path)).values() if t.ndim == 4]
    total = sum(t.size for t in kernels)
    if not total:
        return None
    small = sum(int(np.count_nonzero(np.abs(t) < threshold)) for t in kernels)
    return round(100.0 * small / total, 2)


DERIVED: dict[str, Callable[[str | Path | None, str], float | None]] = {
    "float_abs_lt_1e-3": small_weight_share,
}


def measure(m: Mapping[str, Any], metric: str, runs_dir: str | Path | None = None) -> Measurement | None:
    """The number a metric path points to in one run's metrics, with std/CI from its parent
    entry when the path ends in '.mean'. 'derived.<name>' is computed from runs/<run>/."""
    value = get_path(m, metric)
    if value is None and metric.startswith("derived."):
        fn = DERIVED.get(metric.split(".", 1)[1])
        value = fn(runs_dir, str(m.get("run"))) if fn else None
    if not _is_number(value):
        return None
    std = ci = n = None
    if metric.endswith(".mean"):
        parent = get_path(m, metric[: -len(".mean")])
        if isinstance(parent, Mapping):
            std = parent.get("std") if _is_number(parent.get("std")) else None
            raw_ci = parent.get("ci95")
            if isinstance(raw_ci, (list, tuple)) and len(raw_ci) == 2 and all(map(_is_number, raw_ci)):
                ci = (float(raw_ci[0]), float(raw_ci[1]))
            seeds = parent.get("per_seed")
            n = len(seeds) if isinstance(seeds, list) else None
    return Measurement(mean=float(value), std=std, ci95=ci, n_seeds=n)


# --------------------------------------------------------------------------------------------
# Verdict rules
# --------------------------------------------------------------------------------------------

def within_tolerance(reported: float, tolerance: float, measured: Measurement) -> bool:
    """Reproduced when the reported value lies within `tolerance` of the 95% CI of the
    reproduced number (of its mean when no CI is known)."""
    lo, hi = measured.ci95 if measured.ci95 else (measured.mean, measured.mean)
    lo, hi = min(lo, hi, measured.mean), max(lo, hi, measured.mean)
    gap = 0.0 if lo <= reported <= hi else min(abs(reported - lo), abs(reported - hi))
    return gap <= tolerance + 1e-9


def numeric_verdict(claim: NumericClaim, measured: Measurement | None, comparable: bool) -> tuple[str, str | None]:
    """(verdict, would-be verdict when the data were comparable)."""
    if claim.pending:
        return PENDING, None
    if measured is None:
        return NOT_RUN, None
    raw = REPRODUCED if within_tolerance(claim.value, claim.tolerance, measured) else NOT_REPRODUCED
    return (raw, None) if comparable else (NOT_COMPARABLE, raw)


def check_verdict(result: CheckResult, comparable: bool) -> tuple[str, str | None]:
    if result.holds is None:
        return NOT_RUN, None
    raw = REPRODUCED if result.holds else NOT_REPRODUCED
    return (raw, None) if comparable else (NOT_COMPARABLE, raw)


# --------------------------------------------------------------------------------------------
# Qualitative checks (C1-C7). Each takes all metrics plus its registry params.
# --------------------------------------------------------------------------------------------

def _in(m: Mapping[str, Any], key: str, allowed: Iterable[Any] | None) -> bool:
    return allowed is None or norm(key, m.get(key)) in {norm(key, a) for a in allowed}


def _acc(m: Mapping[str, Any], attack: str) -> float | None:
    value = get_path(m, f"accuracy.{attack}.mean")
    return float(value) if _is_number(value) else None


def _channel(m: Mapping[str, Any]) -> float | None:
    value = get_path(m, "sparsity.channel")
    return float(value) if _is_number(value) else None


def pairs(metrics: Sequence[Mapping[str, Any]], base_loss: str, other_loss: str,
          quantizers: Iterable[str] | None = None,
          same: Sequence[str] = ("model", "quantizer", "method")) -> list[tuple[Mapping, Mapping]]:
    """(base, other) runs that agree on `same` fields and differ in loss."""
    out = []
    for base in metrics:
        if norm("loss", base.get("loss")) != base_loss or not _in(base, "quantizer", quantizers):
            continue
        for other in metrics:
            if norm("loss", other.get("loss")) == other_loss and all(
                    norm(k, base.get(k)) == norm(k, other.get(k)) for k in same):
                out.append((base, other))
    return out


def _group(m: Mapping[str, Any]) -> str:
    return f"{m.get('model')}/{m.get('quantizer')}/{m.get('method')}"


def _compare_pairs(found: list[tuple[Mapping, Mapping]], value: Callable[[Mapping], float | None],
                   holds: Callable[[float, float], bool], what: str, names: tuple[str, str]) -> CheckResult:
    evidence, runs = [], []
    for base, other in found:
        a, b = value(base), value(other)
        if a is None or b is None:
            continue
        ok = holds(a, b)
        evidence.append({"group": _group(base), names[0]: base["run"], names[1]: other["run"],
                         f"{what} ({names[0]})": a, f"{what} ({names[1]})": b,
                         "difference": round(b - a, 2), "holds": ok})
        runs += [base["run"], other["run"]]
    if not evidence:
        return CheckResult(None, f"no {names[0]}/{names[1]} pair of runs with {what}")
    n_ok = sum(e["holds"] for e in evidence)
    detail = "; ".join(f"{e['group']}: {e[f'{what} ({names[0]})']:.2f} -> {e[f'{what} ({names[1]})']:.2f}"
                       for e in evidence)
    return CheckResult(n_ok == len(evidence), f"{n_ok}/{len(evidence)} pairs hold ({what}, "
                       f"{names[0]} -> {names[1]}): {detail}", evidence, sorted(set(runs)))


def quantized_weights_sparse(metrics: Sequence[Mapping[str, Any]], quantizers: Sequence[str] = ("ternary", "4bit"),
                             methods: Sequence[str] = ("BR",), losses: Sequence[str] = ("pgd_at", "tradeoff"),
                             min_weight_sparsity: float = 10.0) -> CheckResult:
    """C1: every adversarially trained ternary/4-bit BR run has weight sparsity >= threshold."""
    evidence = []
    for m in metrics:
        if _in(m, "quantizer", quantizers) and _in(m, "method", methods) and _in(m, "loss", losses):
            value = get_path(m, "sparsity.weight")
            if _is_number(value):
                evidence.append({"run": m["run"], "weight sparsity": float(value),
                                 "holds": float(value) >= min_weight_sparsity})
    if not evidence:
        return CheckResult(None, "no adversarially trained ternary/4-bit BR run with sparsity")
    n_ok = sum(e["holds"] for e in evidence)
    detail = "; ".join(f"{e['run']}: {e['weight sparsity']:.2f}%" for e in evidence)
    return CheckResult(n_ok == len(evidence), f"{n_ok}/{len(evidence)} runs have weight sparsity >= "
                       f"{min_weight_sparsity}%: {detail}", evidence, [e["run"] for e in evidence])


def adversarial_sparsity_unstructured(metrics: Sequence[Mapping[str, Any]],
                                      quantizers: Sequence[str] = ("ternary", "4bit")) -> CheckResult:
    """C2: channel sparsity under PGD-AT < under natural training, same model/quantizer/method."""
    return _compare_pairs(pairs(metrics, "natural", "pgd_at", quantizers), _channel,
                          lambda nat, adv: adv < nat, "channel sparsity", ("natural", "pgd_at"))


def tradeoff_recovers_natural(metrics: Sequence[Mapping[str, Any]], min_gain: float = 0.0) -> CheckResult:
    """C3: natural accuracy(tradeoff) > natural accuracy(pgd_at) + min_gain."""
    return _compare_pairs(pairs(metrics, "pgd_at", "tradeoff"), lambda m: _acc(m, "natural"),
                          lambda a, b: b > a + min_gain, "natural accuracy", ("pgd_at", "tradeoff"))


def tradeoff_raises_channel_sparsity(metrics: Sequence[Mapping[str, Any]], min_gain: float = 0.0) -> CheckResult:
    """C4: channel sparsity(tradeoff) > channel sparsity(pgd_at) + min_gain (quantized runs)."""
    found = [(a, b) for a, b in pairs(metrics, "pgd_at", "tradeoff") if norm("quantizer", a.get("quantizer")) != FLOAT]
    return _compare_pairs(found, _channel, lambda a, b: b > a + min_gain, "channel sparsity",
                          ("pgd_at", "tradeoff"))


def tradeoff_keeps_robustness(metrics: Sequence[Mapping[str, Any]], weak: Sequence[str] = ("fgsm",),
                              weak_max_drop: float = 0.5, strong: Sequence[str] = ("ifgsm20", "cw_ref"),
                              strong_max_drop: float = 3.0) -> CheckResult:
    """C5: with the trade-off loss, weak-attack accuracy drops <= weak_max_drop and strong-attack
    accuracy drops <= strong_max_drop, relative to PGD-AT of the same model/quantizer/method."""
    parts = [(attack, weak_max_drop) for attack in weak] + [(attack, strong_max_drop) for attack in strong]
    evidence, runs, lines = [], set(), []
    for attack, max_drop in parts:
        res = _compare_pairs(pairs(metrics, "pgd_at", "tradeoff"), lambda m, a=attack: _acc(m, a),
                             lambda a, b, d=max_drop: b >= a - d, f"{attack} accuracy", ("pgd_at", "tradeoff"))
        if res.holds is not None:
            for e in res.evidence:
                e["attack"], e["max drop"] = attack, max_drop
            evidence += res.evidence
            runs |= set(res.runs)
            lines.append(f"{attack} (max drop {max_drop} pp): {res.detail}")
    if not evidence:
        return CheckResult(None, "no pgd_at/tradeoff pair with the attacks " + ", ".join(a for a, _ in parts))
    return CheckResult(all(e["holds"] for e in evidence), " | ".join(lines), evidence, sorted(runs))


MODEL_NAME = re.compile(r"^(?:en(\d+))?(resnet\d+)$")


def ensemble_size(model: str) -> tuple[int, str] | None:
    """('en2resnet20') -> (2, 'resnet20'); plain 'resnet20' -> (0, 'resnet20')."""
    found = MODEL_NAME.match(str(model).lower())
    return (int(found.group(1) or 0), found.group(2)) if found else None


def ensemble_ordering(metrics: Sequence[Mapping[str, Any]], loss: str = "pgd_at", quantizer: str = FLOAT,
                      attacks: Sequence[str] = ("natural", "fgsm", "ifgsm20", "cw_ref"),
                      slack: float = 0.0) -> CheckResult:
    """C6: for each attack, accuracy rises with k: plain ResNet (k=0) < En1 < En2 < En5
    (each step may fall short by at most `slack` pp), same depth, loss and quantizer."""
    groups: dict[str, dict[int, Mapping]] = {}
    for m in metrics:
        parsed = ensemble_size(m.get("model", ""))
        if parsed and norm("loss", m.get("loss")) == loss and norm("quantizer", m.get("quantizer")) == quantizer:
            groups.setdefault(parsed[1], {}).setdefault(parsed[0], m)
    evidence, runs, lines = [], set(), []
    for base, by_k in sorted(groups.items()):
        ks = sorted(by_k)
        if len(ks) < 2:
            continue
        for attack in attacks:
            values = [(k, _acc(by_k[k], attack)) for k in ks]
            values = [(k, v) for k, v in values if v is not None]
            if len(values) < 2:
                continue
            ok = all(b > a - slack for (_, a), (_, b) in zip(values, values[1:]))
            evidence.append({"base": base, "attack": attack, "by_k": {str(k): v for k, v in values}, "holds": ok})
            runs |= {by_k[k]["run"] for k, _ in values}
            lines.append(f"{base} {attack}: " + " < ".join(f"k={k} {v:.2f}" for k, v in values)
                         + ("" if ok else " (order broken)"))
    if not evidence:
        return CheckResult(None, f"fewer than two of resnet/en_k resnet runs with loss {loss}")
    return CheckResult(all(e["holds"] for e in evidence), "; ".join(lines), evidence, sorted(runs))


def quantized_benchmark_complete(metrics: Sequence[Mapping[str, Any]],
                                 quantizers: Sequence[str] = ("binary", "ternary", "4bit"),
                                 attacks: Sequence[str] = ("natural", "fgsm", "ifgsm20", "cw_ref"),
                                 max_levels: Mapping[str, int] | None = None) -> CheckResult:
    """C7: every quantizer has a run evaluated under every paper attack, on deployed weights
    (each quantized layer holds at most max_levels distinct values; sanity checks passed)."""
    max_levels = dict(max_levels or {"binary": 3, "ternary": 3, "4bit": 15})
    evidence, runs, missing = [], [], []
    for quant in quantizers:
        candidates = [m for m in metrics if norm("quantizer", m.get("quantizer")) == quant]
        complete = [m for m in candidates if all(_acc(m, a) is not None for a in attacks)]
        if not complete:
            missing.append(quant)
            continue
        for m in complete:
            layers = get_path(m, "sparsity.layers") or []
            levels = [row.get("levels") for row in layers if _is_number(row.get("levels"))]
            limit = max_levels.get(quant)
            deployed = bool(levels) and (limit is None or max(levels) <= limit)
            sanity = m.get("sanity") or {}
            failed = sorted(k for k, v in sanity.items() if isinstance(v, Mapping) and v.get("passed") is False)
            evidence.append({"quantizer": quant, "run": m["run"], "max levels": max(levels) if levels else None,
                             "deployed weights": deployed, "failed sanity": failed,
                             "holds": deployed and not failed})
            runs.append(m["run"])
    if missing and not evidence:
        return CheckResult(None, f"no quantized run evaluated under {', '.join(attacks)}")
    if missing:
        return CheckResult(None, f"incomplete: no run for {', '.join(missing)} evaluated under all of "
                           f"{', '.join(attacks)}", evidence, runs)
    bad = [e for e in evidence if not e["holds"]]
    detail = (f"{len(evidence)} quantized runs cover {', '.join(quantizers)} x {', '.join(attacks)}"
              + ("" if not bad else "; not on deployed weights or failed sanity: "
                 + ", ".join(f"{e['run']} (levels {e['max levels']}, failed {e['failed sanity']})" for e in bad)))
    return CheckResult(not bad, detail, evidence, runs)


CHECKS: dict[str, Callable[..., CheckResult]] = {
    "quantized_weights_sparse": quantized_weights_sparse,
    "adversarial_sparsity_unstructured": adversarial_sparsity_unstructured,
    "tradeoff_recovers_natural": tradeoff_recovers_natural,
    "tradeoff_raises_channel_sparsity": tradeoff_raises_channel_sparsity,
    "tradeoff_keeps_robustness": tradeoff_keeps_robustness,
    "ensemble_ordering": ensemble_ordering,
    "quantized_benchmark_complete": quantized_benchmark_complete,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Validate a registry file: `python -m paper_repro.claims [path]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        reg = load_registry(argv[0] if argv else None)
    except RegistryError as exc:
        print(exc, file=sys.stderr)
        return 1
    pending = sum(c.pending for c in reg.numeric)
    print(f"{reg.path}: valid; {len(reg.numeric)} numbers ({pending} pending), "
          f"{len(reg.qualitative)} qualitative checks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
