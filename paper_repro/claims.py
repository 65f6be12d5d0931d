"""The claims registry (claims.yaml): its schema, loading and validation. How a registry number is
resolved to a run and judged (the verdict rules) lives in verdicts.py; the C1-C7 checks in checks.py.

Why here: every number the reproduction is judged against lives in one reviewed YAML file, and a
malformed entry is refused with every problem listed, before any verdict is computed from it.
`python -m paper_repro.claims` validates the registry (use it after editing claims.yaml).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from . import checks

REGISTRY_PATH = Path(__file__).with_name("claims.yaml")

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


CHECKS = checks.CHECKS  # the check names a qualitative entry may use


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
