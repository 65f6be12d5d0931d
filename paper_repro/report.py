"""``report`` (the report stage): execute the source notebooks with papermill (kernel python3) and export them to HTML.

Why a command rather than a shell loop in dvc.yaml: parameters come from params.yaml (profile and the
``report.notebooks.<name>`` overrides), only parameters a notebook declares are passed (papermill
warns otherwise), and a failing notebook stops the stage with its name. Executed notebooks are
terminal outputs (they change bytes on every run); numbers flow through metrics/ and reports/tables/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from . import atomic, config

KERNEL = "python3"
OUTPUTS = ("notebooks", "figures", "tables")  # what the notebooks write under --out (the stage's DVC outs)
STAGING = ".report-staging"  # under --out: the notebooks run here; kept after a failure, for its notebook


class ReportError(RuntimeError):
    """A notebook failed: one line naming it and its error; the previous report is left as it was."""


def declared_parameters(notebook: Path) -> set[str]:
    import papermill
    return set(papermill.inspect_notebook(str(notebook)))


def notebook_parameters(notebook: Path, base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    declared = declared_parameters(notebook)
    unknown = sorted(set(overrides) - declared)
    if unknown:
        raise config.ConfigError(f"report.notebooks.{notebook.stem}: {unknown[0]} is not a parameter of "
                                 f"{notebook.name} (declared: {', '.join(sorted(declared))})")
    merged = {**base, **overrides}
    return {k: v for k, v in merged.items() if k in declared}


def export_html(executed: Path) -> Path:
    import nbformat
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    return atomic.write_text(executed.with_suffix(".html"), body)


def render(notebooks_dir: Path, out_dir: Path, base: dict[str, Any], per_notebook: dict[str, dict[str, Any]],
           only: list[str] | None = None, quiet: bool = False) -> list[Path]:
    """Execute the notebooks into a staging folder; only when all succeed, move their outputs into ``out_dir``
    (a full run also drops outputs no notebook wrote any more). A failure leaves ``out_dir`` untouched."""
    import papermill
    sources = sorted(notebooks_dir.glob("*.ipynb"))
    if only:
        sources = [s for s in sources if s.stem in only]
    if not sources:
        raise config.ConfigError(f"no notebooks found in {notebooks_dir}")
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "notebooks").mkdir(parents=True)
    staged = {**base, "out_dir": str(staging)}
    for source in sources:
        params = notebook_parameters(source, staged, per_notebook.get(source.stem, {}))
        target = staging / "notebooks" / source.name
        print(f"report: executing {source.name}", flush=True)
        try:
            papermill.execute_notebook(str(source), str(target), parameters=params, kernel_name=KERNEL,
                                       progress_bar=not quiet, log_output=False)
        except papermill.PapermillExecutionError as e:
            raise ReportError(f"notebook {source.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}; "
                              f"{out_dir} is unchanged; the failed notebook is {target}") from None
        export_html(target)
    return promote(staging, out_dir, full=not only)


def promote(staging: Path, out_dir: Path, full: bool) -> list[Path]:
    """Move every staged file to the same place under ``out_dir`` (one rename each) and remove the staging
    folder; with ``full``, files of OUTPUTS that the run did not write are removed (stale figures, tables)."""
    staged = sorted(p for p in staging.rglob("*") if p.is_file())
    written = []
    for path in staged:
        target = out_dir / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        written.append(target)
    if full:
        fresh = set(written)
        for sub in OUTPUTS:
            for old in sorted((out_dir / sub).rglob("*")) if (out_dir / sub).is_dir() else []:
                if old.is_file() and old not in fresh:
                    old.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--notebooks", type=Path, help="source notebooks (default: notebooks/ of the package's repo)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="figures/, tables/ and notebooks/ go here")
    p.add_argument("--metrics", type=Path, default=Path("metrics"))
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--only", nargs="+", help="notebook names (stems) to run")
    p.add_argument("--bundle", type=Path,
                   help="rebuild from a published bundle (results/<profile>/) instead: its metrics, packed models, "
                        "verification and notebook parameters; no params.yaml, training or dataset needed")


def bundle_inputs(bundle: Path, out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Notebook parameters that point at a published bundle (see publish.py)."""
    manifest = bundle / "bundle.json"
    if not manifest.is_file():
        raise config.ConfigError(f"{bundle}: not a published bundle (no bundle.json); see `python -m paper_repro "
                                 f"publish --help`")
    params = json.loads((bundle / "report_params.json").read_text())
    base = {"metrics_dir": str(bundle / "metrics"), "runs_dir": str(bundle / "models"),
            "data_meta": str(bundle / "data.json"), "out_dir": str(out), "profile": params["profile"],
            "verification_json": str(bundle / "verification.json")}
    return base, params.get("notebooks", {}) or {}


def main(args: argparse.Namespace) -> int:
    notebooks = args.notebooks or Path(__file__).resolve().parents[1] / "notebooks"
    if args.bundle:
        base, per_notebook = bundle_inputs(args.bundle, args.out)
        render(notebooks, args.out, base, per_notebook, args.only, args.quiet)
        print(f"report: rebuilt from {args.bundle} into {args.out}")
        return 0
    settings = config.load(args.params, args.overrides)
    if not any(Path(args.metrics).glob("*.json")):
        raise config.ConfigError(f"{args.metrics}: no metrics to report on; run the evaluate stages first "
                                 f"(dvc repro, or python -m paper_repro evaluate -e NAME)")
    base = {"metrics_dir": str(args.metrics), "runs_dir": str(args.runs),
            "data_meta": str(Path(settings.data.prepared) / "meta.json"), "out_dir": str(args.out),
            "profile": settings.profile, "verification_json": str(args.out / "verification.json")}
    per_notebook = settings.report.get("notebooks", {}) or {}
    render(notebooks, args.out, base, per_notebook, args.only, args.quiet)
    print(f"report: executed notebooks and HTML in {args.out / 'notebooks'}, figures in {args.out / 'figures'}, "
          f"tables in {args.out / 'tables'}")
    return 0
