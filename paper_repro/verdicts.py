"""From metrics to verdicts: reading metrics/, whether a run is comparable with the paper, resolving a
reported number of the registry (claims.py) to the one run it is measured on, measuring it with its 95%
interval, and the verdict rules. Intervals and the decision rule live in stats.py, the C1-C7 checks in
checks.py, the recipe comparison in comparability.py.

Why here: the rules that turn metrics into verdicts live in one place, so that a verdict can always be
traced to a registry entry and to the metrics fields it read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import checks, comparability, stats
from .claims import MapsTo, NumericClaim, _is_number
from .metrics_schema import dataset_of
from .metrics_schema import read_metrics
from .recipe import DATASET_LABELS, DEFAULT_DATASET

NOT_COMPARABLE_BANNER = "NOT COMPARABLE WITH THE PAPER"  # the one wording every report and figure uses

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_RUN = "not run"
NOT_COMPARABLE = "not comparable"
INCONCLUSIVE = "inconclusive at this scale"
PENDING = "pending"
REGISTRY_ERROR = "registry error"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN, NOT_COMPARABLE, PENDING, REGISTRY_ERROR)

FLOAT = checks.FLOAT


@dataclass(frozen=True)
class Measurement:
    """A reproduced number with its spread over evaluation seeds (None where unknown)."""

    mean: float
    std: float | None = None
    ci95: tuple[float, float] | None = None
    n_seeds: int | None = None
    ci_method: str | None = None


CheckResult = checks.CheckResult


# --------------------------------------------------------------------------------------------
# Reading metrics
# --------------------------------------------------------------------------------------------

def load_metrics(metrics_dir: str | Path) -> list[dict[str, Any]]:
    """All metrics/<run>.json documents, each validated against the schema (metrics_schema.read_metrics:
    a malformed one is a MetricsError naming the file and key, never silently dropped), sorted by run;
    a missing folder gives []."""
    folder = Path(metrics_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        data = read_metrics(path)
        data.setdefault("run", path.stem)
        out.append(data)
    return sorted(out, key=lambda m: m["run"])


def is_official(m: Mapping[str, Any]) -> bool:
    return bool((m.get("data") or {}).get("official", False))


def deviations(m: Mapping[str, Any]) -> list[str]:
    """How the run's recipe, data and evaluation in effect differ from the paper's (comparability.deviations)."""
    return comparability.deviations(m)


def is_comparable(m: Mapping[str, Any]) -> bool:
    """Comparable with the paper: official data and exactly the paper's recipe and evaluation, as
    recorded in the run's metrics (not its profile label)."""
    return not deviations(m)


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


def matches(m: Mapping[str, Any], select: Mapping[str, Any]) -> bool:
    for key, want in select.items():
        have = dataset_of(m) if key == "dataset" else m.get(key)
        if isinstance(want, Mapping):
            if not isinstance(have, Mapping) or {k: float(v) for k, v in have.items()} != {
                    k: float(v) for k, v in want.items()}:
                return False
        elif norm(key, have) != norm(key, want):
            return False
    return True


def resolve_run(metrics: Iterable[Mapping[str, Any]], maps_to: MapsTo) -> tuple[Mapping[str, Any] | None, str]:
    """The one run a reported number is measured on: the run named by maps_to.run, on the number's dataset
    (maps_to.select.dataset; CIFAR-10 when the select leaves it out, as claims.validate reads it), which must also
    have the other fields of maps_to.select. Returns (run, "") or (None, why): "not run" when it is missing (look-alike
    runs are never used instead) or when the named run is on another dataset (a profile with data.dataset cifar100
    names its runs as the CIFAR-10 grid does), a registry error when the named run has other fields."""
    metrics = list(metrics)
    select = {"dataset": DEFAULT_DATASET, **maps_to.select}
    named = [m for m in metrics if m.get("run") == maps_to.run]
    if not named:
        alike = [m["run"] for m in metrics if maps_to.select and matches(m, select)]
        extra = (f"; {len(alike)} other run(s) match its select ({', '.join(alike)}) but a reported number "
                 f"maps to one named run" if alike else "")
        return None, f"no run named {maps_to.run}{extra}"
    run = named[0]
    have, want = dataset_of(run), str(select["dataset"])
    if have != want:
        return None, (f"no {DATASET_LABELS.get(want, want)} run named {maps_to.run}: the run of that name is on "
                      f"{DATASET_LABELS.get(have, have)}")
    if not matches(run, select):
        differ = {k: run.get(k) for k in maps_to.select if not matches(run, {k: maps_to.select[k]})}
        return None, f"registry error: run {maps_to.run} has {differ}, not the select {dict(maps_to.select)}"
    return run, ""


def find_runs(metrics: Iterable[Mapping[str, Any]], maps_to: MapsTo) -> list[Mapping[str, Any]]:
    """[the run a reported number maps to] or [] (see resolve_run)."""
    run, _ = resolve_run(metrics, maps_to)
    return [run] if run is not None else []


def norm(field_name: str, value: Any) -> Any:
    return checks.norm(field_name, value)


def measure(m: Mapping[str, Any], metric: str) -> Measurement | None:
    """The number a metric path points to in one run's metrics, with its 95% interval: for an
    accuracy ('accuracy.<attack>.mean') the combined sampling + seed interval of stats.py, for a
    sparsity ('sparsity.channel' / 'sparsity.weight') the Wilson interval of its zero count."""
    value = get_path(m, metric)
    if not _is_number(value):
        return None
    std = n = None
    estimate = None
    if metric.startswith("accuracy.") and metric.endswith(".mean"):
        parent = get_path(m, metric[: -len(".mean")])
        if isinstance(parent, Mapping):
            std = parent.get("std") if _is_number(parent.get("std")) else None
            seeds = parent.get("per_seed")
            n = len(seeds) if isinstance(seeds, list) else None
            estimate = checks.accuracy(m, metric[len("accuracy."): -len(".mean")])
    elif metric in ("sparsity.channel", "sparsity.weight"):
        estimate = checks.sparsity(m.get("sparsity"), metric.split(".")[1])
    ci = (round(estimate.lo, 2), round(estimate.hi, 2)) if estimate is not None else None
    return Measurement(mean=float(value), std=std, ci95=ci, n_seeds=n,
                       ci_method=estimate.how if estimate is not None else None)


# --------------------------------------------------------------------------------------------
# Verdict rules
# --------------------------------------------------------------------------------------------

def within_tolerance(reported: float, tolerance: float, measured: Measurement) -> bool:
    """Reproduced when the reported value lies within `tolerance` of the 95% interval of the
    reproduced number (of its mean when no interval is known)."""
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


CHECK_VERDICT = {stats.HOLDS: REPRODUCED, stats.FAILS: NOT_REPRODUCED, stats.INCONCLUSIVE: INCONCLUSIVE}


def check_verdict(result: "checks.CheckResult", comparable: bool) -> tuple[str, str | None]:
    if result.outcome is None:
        return NOT_RUN, None
    raw = CHECK_VERDICT[result.outcome]
    return (raw, None) if comparable else (NOT_COMPARABLE, raw)

