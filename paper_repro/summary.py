"""The cross-run summary: one row per metrics/<run>.json (summary.csv) and the compact per-run table
`dvc metrics show` prints (reports/metrics.json). Written by the verify stage."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping

from . import atomic, recipe
from .metrics_schema import read_metrics

PAPER_KEYS = recipe.PAPER_ATTACKS
SUMMARY_BASE = ("run", "model", "quantizer", "method", "loss", "profile", "official")
SUMMARY_TAIL = ("sparsity_weight", "sparsity_channel", "size_compression", "n_examples", "n_seeds", "noise",
                "sanity_failed")


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
        docs.append(read_metrics(path))  # every file there is a run's metrics: a malformed one stops here
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
