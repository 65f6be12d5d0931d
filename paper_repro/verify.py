"""verify: the claims registry against metrics/ -> reports/verification.md and .json.

Why: one table that answers, per reported number and per qualitative claim, "does it hold, on
which data, with which run?". Verdicts: reproduced / not reproduced / inconclusive at this scale /
not run / not comparable (naming the deviations from the paper recipe, with the verdict it would
have) / pending / registry error; the rules are printed in the report's header (RULES). Every number
it uses comes from metrics/ (never from run folders). With --strict the exit code is non-zero when a comparable
claim is not reproduced, so CI on the paper profile can gate on it.

Mounted by the CLI as `python -m paper_repro verify --metrics metrics --out reports [--strict]`
through `add_arguments(parser)` and `main(args)`; also runs as `python -m paper_repro.verify`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import atomic
from . import claims as C
from . import stats, summary
from . import verdicts as V

REPORT_SCHEMA_VERSION = 2
NOT_COMPARABLE_BANNER = V.NOT_COMPARABLE_BANNER


def _notes_for(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a reader must know about the runs behind a verdict (a quantized run that never trained quantized)."""
    return [f"{m['run']} never trained quantized (no phase-2 epoch): its deployed Q(W) is an untrained projection"
            for m in runs if (m.get("training") or {}).get("trained_quantized") is False]


def deviation_text(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The deviations from the paper recipe of the runs behind a verdict, each once: those of every run
    as they are, the others with the runs they concern ("BR rho 4 vs 1.05 (7 of 10 runs: ...)")."""
    per_run = [(str(m.get("run")), V.deviations(m)) for m in runs]
    if not per_run:
        return []
    order: dict[str, list[str]] = {}
    for run, devs in per_run:
        for d in devs:
            order.setdefault(d, []).append(run)
    out = []
    for d, which in order.items():
        if len(which) == len(per_run):
            out.append(d)
        else:
            names = ", ".join(which) if len(which) <= 3 else ", ".join(which[:3]) + ", ..."
            out.append(f"{d} ({len(which)} of {len(per_run)} runs: {names})")
    return out


def evaluate_numeric(claim: C.NumericClaim, metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row of the report for a reported number (pending rows still show what we measured)."""
    row: dict[str, Any] = {
        "id": claim.id, "kind": "number", "claim": claim.label, "source": claim.source,
        "citation": claim.citation, "table": claim.table, "row": claim.row, "column": claim.column,
        "dataset": claim.dataset, "reported": claim.value, "tolerance": claim.tolerance,
        "run": None, "metric": None, "select": {}, "reproduced": None, "std": None, "ci95": None, "n_seeds": None,
        "ci_method": None, "difference": None, "comparable": None, "deviations": [], "would_be": None, "detail": "",
    }
    measured, run, problem = None, None, ""
    if claim.maps_to is None:
        row["detail"] = "not produced by this companion (maps_to: null)"
    else:
        row["metric"] = claim.maps_to.metric
        row["select"] = dict(claim.maps_to.select)
        run, problem = V.resolve_run(metrics, claim.maps_to)
        if run is None:
            row["detail"] = problem
        else:
            row["run"] = run["run"]
            measured = V.measure(run, claim.maps_to.metric)
            notes = [] if measured is not None else [f"metric {claim.maps_to.metric} missing in {run['run']}"]
            row["detail"] = "; ".join(notes + _notes_for([run]))
    devs = deviation_text([run]) if run is not None else []
    comparable = run is not None and not devs
    if measured is not None:
        row.update(reproduced=round(measured.mean, 2), std=measured.std,
                   ci95=list(measured.ci95) if measured.ci95 else None, n_seeds=measured.n_seeds,
                   ci_method=measured.ci_method, comparable=comparable, deviations=devs)
        if claim.value is not None:
            row["difference"] = round(measured.mean - claim.value, 2)
    if problem.startswith("registry error"):
        row["verdict"], row["would_be"] = V.REGISTRY_ERROR, None
    else:
        row["verdict"], row["would_be"] = V.numeric_verdict(claim, measured, comparable)
    return row


def evaluate_qualitative(claim: C.QualitativeClaim, metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One row of the report for a qualitative claim, from its check over all metrics."""
    result = C.CHECKS[claim.check](metrics, **claim.params)
    used = [m for m in metrics if m.get("run") in set(result.runs)]
    devs = deviation_text(used)
    comparable = bool(used) and not devs
    verdict, would_be = V.check_verdict(result, comparable)
    notes = _notes_for(used)
    return {"id": claim.id, "kind": "qualitative", "claim": claim.claim, "check": claim.check,
            "params": dict(claim.params), "verdict": verdict, "would_be": would_be, "outcome": result.outcome,
            "comparable": comparable if result.outcome is not None else None, "deviations": devs,
            "detail": result.detail + ("" if not notes else " | " + "; ".join(notes)),
            "runs": result.runs, "evidence": result.evidence, "note": claim.note}


def provenance(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the verdicts rest on: how many runs, which profiles, which data, which code."""
    comparable = bool(metrics) and all(V.is_comparable(m) for m in metrics)
    commits = sorted({str(((m.get("provenance") or {}).get("versions") or {}).get("code_commit", "unknown"))
                      for m in metrics})
    return {
        "n_runs": len(metrics),
        "profiles": sorted({str(m.get("profile")) for m in metrics}),
        "official_data": sorted({V.is_official(m) for m in metrics}),
        "data_sources": sorted({str((m.get("data") or {}).get("source")) for m in metrics}),
        "data_md5": sorted({str((m.get("data") or {}).get("archive_md5")) for m in metrics}),
        "code_commits": commits,
        "comparable": comparable,
        "deviations": deviation_text(list(metrics)),
        "banner": "" if comparable else NOT_COMPARABLE_BANNER,
    }


RULES = {
    "numbers": "reproduced when the reported value lies within the tolerance (pp) of the reproduced 95% interval "
               "(of the value without one); a reported number maps to one named run: a missing run is 'not run', "
               "a run whose fields contradict the registry's select is a 'registry error'",
    "checks": stats.DECISION_RULE + "; runs pair only when every experiment field except the varied loss agrees",
    "intervals": stats.INTERVAL_RULE,
    "comparability": "comparable only when the settings in effect (recorded in each run's metrics) equal the paper "
                     "recipe of paper-spec sections 5-6 on official data; otherwise 'not comparable', naming the "
                     "deviations, with the verdict it would have",
}


def build_report(registry: C.Registry, metrics: Sequence[Mapping[str, Any]], metrics_dir: str = "") -> dict[str, Any]:
    numeric = [evaluate_numeric(c, metrics) for c in registry.numeric]
    qualitative = [evaluate_qualitative(c, metrics) for c in registry.qualitative]
    rows = numeric + qualitative
    failures = [r["id"] for r in rows if r["verdict"] in (V.NOT_REPRODUCED, V.REGISTRY_ERROR)]
    counts = Counter(r["verdict"] for r in rows)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "registry": Path(registry.path).name if registry.path else "",
        "metrics_dir": Path(metrics_dir).name if metrics_dir else "",
        "provenance": provenance(metrics),
        "rules": RULES,
        "counts": {v: counts.get(v, 0) for v in V.VERDICTS},
        "numeric": numeric,
        "qualitative": qualitative,
        "strict_failures": failures,
        "exit_code_strict": 1 if failures else 0,
    }


def exit_code(report: Mapping[str, Any], strict: bool) -> int:
    """0 unless strict and some comparable claim is not reproduced."""
    return int(bool(strict and report["strict_failures"]))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def fmt_reproduced(row: Mapping[str, Any]) -> str:
    if row.get("reproduced") is None:
        return "-"
    text = fmt(row["reproduced"])
    if row.get("std") is not None:
        text += f" ± {row['std']:.2f}"
    if row.get("ci95"):
        text += f" [{row['ci95'][0]:.2f}, {row['ci95'][1]:.2f}]"
    if row.get("n_seeds"):
        text += f" (n={row['n_seeds']})"
    return text


def fmt_verdict(row: Mapping[str, Any]) -> str:
    if row.get("would_be"):
        return f"{row['verdict']} (would be: {row['would_be']})"
    return row["verdict"]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


NUMERIC_HEADER = ("Claim", "Source", "Reported", "Reproduced (± std, 95% CI)", "Difference",
                  "Tolerance", "Run / metric", "Verdict")


def numeric_cells(r: Mapping[str, Any]) -> list[str]:
    where = f"{r['run']} / {r['metric']}" if r.get("run") else (r.get("metric") or "-")
    return [f"{r['id']}: {r['claim']}", r["source"], fmt(r["reported"]), fmt_reproduced(r),
            fmt(r["difference"]), fmt(r["tolerance"], 1), where, fmt_verdict(r)]


def render_markdown(report: Mapping[str, Any]) -> str:
    prov = report["provenance"]
    lines = ["# Verification of the reported numbers and claims", ""]
    if prov["banner"]:
        lines += [f"**{prov['banner']}**: metrics from profile(s) {', '.join(prov['profiles']) or '-'}, "
                  f"official data {prov['official_data'] or '-'}. Numbers are shown; verdicts read "
                  "'not comparable' (with the verdict they would have).", "",
                  "Deviations from the paper recipe: " + ("; ".join(prov["deviations"]) or "-") + ".", ""]
    lines += [f"Runs: {prov['n_runs']}; profiles: {', '.join(prov['profiles']) or '-'}; data sources: "
              f"{', '.join(prov['data_sources']) or '-'} (md5 {', '.join(prov['data_md5']) or '-'}); code "
              f"commit(s): {', '.join(prov['code_commits']) or '-'}.", "",
              "How to read the verdicts:", "",
              *[f"- **{k}**: {v}." for k, v in report["rules"].items()], "",
              "Verdict counts: " + ", ".join(f"{k}: {v}" for k, v in report["counts"].items()), "",
              "## Qualitative claims (paper-spec C1-C7)", "",
              markdown_table(("Claim", "Statement", "Evidence", "Verdict"),
                             [(r["id"], r["claim"], r["detail"], fmt_verdict(r)) for r in report["qualitative"]]),
              "", "## Reported numbers", "",
              markdown_table(NUMERIC_HEADER, [numeric_cells(r) for r in report["numeric"]]), ""]
    notes = [f"- {r['id']}: {r['detail']}" for r in report["numeric"] if r["detail"] and r["reproduced"] is not None]
    if notes:
        lines += ["## Notes", ""] + notes + [""]
    return "\n".join(lines)


def render_console(report: Mapping[str, Any]) -> str:
    """A compact text table for the terminal."""
    rows = [(r["id"], fmt(r.get("reported")), fmt_reproduced(r) if r["kind"] == "number" else "-",
             fmt(r.get("difference")), fmt_verdict(r)) for r in report["qualitative"] + report["numeric"]]
    header = ("claim", "reported", "reproduced", "diff", "verdict")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(header), line("-" * w for w in widths)] + [line(r) for r in rows]
    prov = report["provenance"]
    if prov["banner"]:
        out.insert(0, f"{prov['banner']} (profiles {', '.join(prov['profiles']) or '-'}, "
                      f"official data {prov['official_data'] or '-'})")
    out.append("counts: " + ", ".join(f"{k}: {v}" for k, v in report["counts"].items()))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def run(metrics_dir: str | Path, out_dir: str | Path, strict: bool = False,
        registry: C.Registry | str | Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Validate every metrics file, write the cross-run summary (<out_dir>/summary.csv and the compact
    metrics.json), verify every claim into <out_dir>/verification.md and .json, print the table.
    The report's "exit_code" is what the CLI should return (non-zero only with strict)."""
    reg = registry if isinstance(registry, C.Registry) else C.load_registry(registry)
    metrics = V.load_metrics(metrics_dir)
    out = Path(out_dir)
    summary.summarize(metrics_dir, out / "summary.csv", out / "metrics.json")
    report = build_report(reg, metrics, metrics_dir=str(metrics_dir))
    report["strict"] = bool(strict)
    report["exit_code"] = exit_code(report, strict)
    atomic.write_text(out / "verification.json", json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic.write_text(out / "verification.md", render_markdown(report))
    if not quiet:
        print(render_console(report))
        print(f"wrote {out / 'verification.md'} and {out / 'verification.json'}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--metrics", default="metrics", help="folder of metrics/<run>.json (default: metrics)")
    parser.add_argument("--out", default="reports", help="where verification.md/.json go (default: reports)")
    parser.add_argument("--registry", default=None, help="claims registry (default: the packaged claims.yaml)")
    parser.add_argument("--strict", action="store_true",
                        help="exit non-zero when a comparable claim is not reproduced")
    parser.add_argument("--no-table", action="store_true", help="do not print the table (files are still written)")
    return parser


def main(args: argparse.Namespace) -> int:
    if not Path(args.metrics).is_dir():
        print(f"error: {args.metrics}: no metrics folder (run `python -m paper_repro evaluate -e <experiment>` "
              f"first, or pass --metrics)", file=sys.stderr)
        return 2
    try:
        report = run(args.metrics, args.out, strict=args.strict, registry=args.registry,
                     quiet=args.no_table)
    except (C.RegistryError, ValueError) as exc:  # a malformed registry or metrics file: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report["exit_code"]


if __name__ == "__main__":
    _parser = add_arguments(argparse.ArgumentParser(prog="python -m paper_repro.verify", description=__doc__))
    raise SystemExit(main(_parser.parse_args()))
