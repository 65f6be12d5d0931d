"""The metrics document (docs/contracts.md, "metrics"): its version and its validator, shared by
evaluate (before writing), verify (before judging) and the summary table, so that one schema is
checked in one place and a malformed file fails with one line naming the file and the key."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from . import config, recipe

SCHEMA_VERSION = 1
PAPER_COLUMNS = tuple(recipe.PAPER_COLUMNS.values())
METHODS = ("BR", "BC", "none")


class MetricsError(ValueError):
    """A metrics file that breaks the schema or is not JSON: one line naming the file and the key."""


def read_metrics(path: str | Path) -> dict[str, Any]:
    """metrics/<run>.json, validated; MetricsError names the file (and the key) otherwise."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetricsError(f"{path}: not valid JSON ({e}); rerun its evaluate stage") from None
    try:
        validate_metrics(doc)
    except ValueError as e:
        raise MetricsError(f"{path}: {e}") from None
    return doc


def _fail(key: str, message: str) -> None:
    raise MetricsError(f"metrics: {key} {message}")


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
    if data.get("dataset", recipe.DEFAULT_DATASET) not in recipe.DATASETS:
        _fail("data.dataset", f"must be one of {list(recipe.DATASETS)}, got {data.get('dataset')!r}")
    for key in ("archive_md5", "source", "n_train", "n_test"):
        if key not in data:
            _fail(f"data.{key}", "is missing")
    if "amp_in_effect" in m and not isinstance(m["amp_in_effect"], bool):
        _fail("amp_in_effect", f"must be true or false (bf16 autocast ran), got {m['amp_in_effect']!r}")
    training = m.get("training")
    trained_amp = training.get("amp_in_effect") if isinstance(training, Mapping) else None
    if trained_amp is not None and not isinstance(trained_amp, bool):
        _fail("training.amp_in_effect", f"must be true, false or null (not recorded), got {trained_amp!r}")
    prov = _require(m, "provenance", Mapping)
    for key in ("epochs", "train_seed", "versions", "device", "wall_s"):
        if key not in prov:
            _fail(f"provenance.{key}", "is missing")


def dataset_of(m: Mapping[str, Any]) -> str:
    """The dataset a run was trained and evaluated on (data.dataset; documents written before it was recorded
    are CIFAR-10, the only dataset then)."""
    return str((m.get("data") or {}).get("dataset", recipe.DEFAULT_DATASET))
