"""The claims registry (claims.yaml): loading, validation, resolving a reported number to the one
run it is measured on, and the verdict rules. The C1-C7 checks live in checks.py, intervals and the
decision rule in stats.py, the paper recipe that decides comparability in recipe.py.

Why here: every number the reproduction is judged against lives in one reviewed YAML file, and
the rules that turn metrics into verdicts live next to it, so that a verdict can always be traced
to a registry entry and to the metrics fields it read. `python -m paper_repro.claims` validates
the registry (use it after editing claims.yaml).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from . import checks, comparability, stats
from .metrics_schema import dataset_of
from .metrics_schema import read_metrics

REGISTRY_PATH = Path(__file__).with_name("claims.yaml")
NOT_COMPARABLE_BANNER = "NOT COMPARABLE WITH THE PAPER"  # the one wording every report and figure uses

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_RUN = "not run"
NOT_COMPARABLE = "not comparable"
INCONCLUSIVE = "inconclusive at this scale"
PENDING = "pending"
REGISTRY_ERROR = "registry error"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN, NOT_COMPARABLE, PENDING, REGISTRY_ERROR)

DATASETS = ("cifar10", "cifar100", "svhn")
NUMERIC_REQUIRED = ("id", "source", "citation", "table", "row", "column", "dataset", "value",
                    "tolerance", "maps_to")
NUMERIC_OPTIONAL = ("note",)
MAPS_TO_KEYS = ("run", "select", "metric")
SELECT_FIELDS = ("model", "quantizer", "method", "loss", "noise", "loss_params", "dataset")
QUALITATIVE_REQUIRED = ("id", "claim", "check", "params")
QUALITATIVE_OPTIONAL = ("note",)
# A value taken from the paper itself must say where it is printed.
PAPER_SOURCE = "paper"
PAGE_OR_TABLE = re.compile(r"\b(p\.|pp\.|page|table|tab\.)\s*\S", re.IGNORECASE)
FLOAT = checks.FLOAT


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
    ci_method: str | None = None


CheckResult = checks.CheckResult


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
    if maps_to is not None and maps_to.select.get("dataset", "cifar10") != entry.get("dataset"):
        own.append(f"{name}: a {entry.get('dataset')} number must map to a run on {entry.get('dataset')} "
                   f"(maps_to.select.dataset is {maps_to.select.get('dataset', 'cifar10 (absent)')!r})")
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
    """The one run a reported number is measured on: the run named by maps_to.run, which must also
    have the fields of maps_to.select. Returns (run, "") or (None, why): "not run" when it is missing
    (look-alike runs are never used instead), a registry error when the named run has other fields."""
    metrics = list(metrics)
    named = [m for m in metrics if m.get("run") == maps_to.run]
    if not named:
        alike = [m["run"] for m in metrics if maps_to.select and matches(m, maps_to.select)]
        extra = (f"; {len(alike)} other run(s) match its select ({', '.join(alike)}) but a reported number "
                 f"maps to one named run" if alike else "")
        return None, f"no run named {maps_to.run}{extra}"
    run = named[0]
    if maps_to.select and not matches(run, maps_to.select):
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


CHECKS = checks.CHECKS


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
