"""The notebooks' tables (``from paper_repro import tables as R``): metrics as DataFrames, the tables
each notebook shows, and writing a table as CSV + Markdown + LaTeX with the provenance banner.

Why: the notebooks must stay short and must never retype a number; everything they show flows from
metrics/<run>.json (and reports/verification.json for verdicts, never recomputed) through these
functions. What every notebook shares (parameters, run selection, the banner, display) lives in
notebook.py, the figures in figures.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import atomic
from . import checks, recipe
from . import claims as C
from . import verdicts as V
from .notebook import NOT_RUN, in_notebook, ordered, read_json, select, variant, variant_order

PAPER_ATTACKS = ("natural", "fgsm", "ifgsm20", "cw_ref")
PAPER_COLUMNS = recipe.PAPER_COLUMNS
ATTACK_LABELS = {"natural": "A1 natural", "fgsm": "A2 FGSM", "ifgsm20": "A3 IFGSM20",
                 "cw_ref": "A4 C&W (ref. variant)"}
DEFAULT_LOSS_WEIGHTS = {"natural": (0.0, 1.0), "pgd_at": (1.0, 0.0), "tradeoff": (8.0, 1.0)}


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------

def loss_weights(m: Mapping[str, Any]) -> tuple[float, float] | None:
    """(w_adv, w_nat) of a run, from loss_params with the per-loss defaults of the spec."""
    loss = m.get("loss")
    params = m.get("loss_params") or {}
    default = DEFAULT_LOSS_WEIGHTS.get(loss)
    if default is None:
        return None
    return float(params.get("w_adv", default[0])), float(params.get("w_nat", default[1]))


def fmt_mean_std(mean: float | None, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return NOT_RUN
    if std is None or (isinstance(std, float) and np.isnan(std)):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def _scalars(d: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numeric entries of a metrics section (drops per-layer lists, count dicts, rule names)."""
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# Metrics as DataFrames
# --------------------------------------------------------------------------------------------

def runs_frame(metrics: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per run: identity, provenance, accuracy mean/std per attack, sparsity, size."""
    rows = []
    for m in metrics:
        parsed = checks.ensemble_size(m.get("model", "")) or (None, None)
        weights = loss_weights(m) or (None, None)
        row = {"run": m.get("run"), "model": m.get("model"), "k": parsed[0], "depth_model": parsed[1],
               "quantizer": m.get("quantizer"), "method": m.get("method"), "loss": m.get("loss"),
               "variant": variant(m.get("quantizer"), m.get("method")), "profile": m.get("profile"),
               "official": V.is_official(m), "comparable": V.is_comparable(m), "noise": m.get("noise"),
               "n_examples": m.get("n_examples"), "n_seeds": len(m.get("seeds") or []),
               "epochs": (m.get("provenance") or {}).get("epochs"), "w_adv": weights[0], "w_nat": weights[1]}
        for attack, entry in (m.get("accuracy") or {}).items():
            row[f"{attack}_mean"], row[f"{attack}_std"] = entry.get("mean"), entry.get("std")
        row.update({f"sparsity_{k}": v for k, v in _scalars(m.get("sparsity")).items()})
        row.update({f"size_{k}": v for k, v in _scalars(m.get("size")).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def accuracy_long(metrics: Sequence[Mapping[str, Any]], attacks: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (run, attack, evaluation seed): what error bars are drawn from."""
    rows = []
    for m in metrics:
        for attack, entry in (m.get("accuracy") or {}).items():
            if attacks is not None and attack not in attacks:
                continue
            values = entry.get("per_seed") or [entry.get("mean")]
            for i, value in enumerate(values):
                if value is not None:
                    rows.append({"run": m.get("run"), "model": m.get("model"), "quantizer": m.get("quantizer"),
                                 "method": m.get("method"), "loss": m.get("loss"),
                                 "variant": variant(m.get("quantizer"), m.get("method")),
                                 "attack": attack, "seed": i, "accuracy": float(value)})
    columns = ["run", "model", "quantizer", "method", "loss", "variant", "attack", "seed", "accuracy"]
    return pd.DataFrame(rows, columns=columns)


def attacks_in(metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    found = [a for m in metrics for a in (m.get("accuracy") or {})]
    return ordered(found, PAPER_ATTACKS)


def accuracy_table(metrics: Sequence[Mapping[str, Any]], attacks: Sequence[str]) -> pd.DataFrame:
    """Runs x attacks, cells 'mean ± std' over evaluation seeds (or 'not run in this profile')."""
    rows = []
    for m in metrics:
        row = {"run": m.get("run"), "variant": variant(m.get("quantizer"), m.get("method")), "loss": m.get("loss")}
        for attack in attacks:
            entry = (m.get("accuracy") or {}).get(attack) or {}
            row[ATTACK_LABELS.get(attack, attack)] = fmt_mean_std(entry.get("mean"), entry.get("std"))
        rows.append(row)
    return pd.DataFrame(rows)


def layers_frame(metrics: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per-layer sparsity rows (metrics["sparsity"]["layers"]) of every run, in layer order."""
    rows = []
    for m in metrics:
        for i, layer in enumerate(V.get_path(m, "sparsity.layers") or []):
            rows.append({"run": m.get("run"), "quantizer": m.get("quantizer"), "method": m.get("method"),
                         "loss": m.get("loss"), "layer_index": i, **layer})
    return pd.DataFrame(rows)


def sparsity_frame(metrics: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Whole-model sparsities (%) per run."""
    rows = [{"run": m.get("run"), "model": m.get("model"), "quantizer": m.get("quantizer"),
             "method": m.get("method"), "loss": m.get("loss"), **_scalars(m.get("sparsity"))} for m in metrics]
    return pd.DataFrame(rows)


def sanity_frame(metrics: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = [{"run": m.get("run"), "check": name, "passed": (v or {}).get("passed"), "detail": (v or {}).get("detail")}
            for m in metrics for name, v in (m.get("sanity") or {}).items()]
    return pd.DataFrame(rows, columns=["run", "check", "passed", "detail"])


def key_value_frame(d: Mapping[str, Any], prefix: str = "") -> pd.DataFrame:
    """A nested mapping (e.g. data/prepared/meta.json) as a two-column table."""
    rows = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += key_value_frame(value, f"{name}.").to_dict("records")
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            rows.append({"key": name, "value": text if len(text) <= 120 else text[:117] + "..."})
    return pd.DataFrame(rows, columns=["key", "value"])


# --------------------------------------------------------------------------------------------
# Notebook-specific tables
# --------------------------------------------------------------------------------------------

def registry_rows(verification: str | Path | Mapping[str, Any], keep: Callable[[C.NumericClaim], bool],
                  registry: str | Path | None = None) -> pd.DataFrame:
    """The verify stage's rows (verification.json: verdicts are never recomputed here) for the registry
    numbers where keep(claim) is true."""
    report = verification if isinstance(verification, Mapping) else (read_json(verification) or {})
    wanted = {c.id for c in C.load_registry(registry).numeric if keep(c)}
    return pd.DataFrame([r for r in report.get("numeric", []) if r["id"] in wanted])


def reported_vs_reproduced(verification: str | Path | Mapping[str, Any], *, source: str, models: Sequence[str],
                           loss: str = "pgd_at", quantizer: str = V.FLOAT, dataset: str = "cifar10",
                           registry: str | Path | None = None) -> pd.DataFrame:
    """Registry numbers of one source next to the reproduced ones (long: model x paper column)."""
    def keep(c: C.NumericClaim) -> bool:
        sel = dict(c.maps_to.select) if c.maps_to else {}
        return (c.source == source and c.dataset == dataset and sel.get("model") in models
                and sel.get("loss") == loss and V.norm("quantizer", sel.get("quantizer")) == quantizer
                and c.maps_to.metric.startswith("accuracy."))

    columns = ["model", "column", "attack", "id", "reported", "reproduced", "std", "difference", "tolerance",
               "verdict", "run"]
    rows = registry_rows(verification, keep, registry)
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows["model"] = [sel.get("model") for sel in rows["select"]]
    rows["attack"] = [m.split(".")[1] for m in rows["metric"]]
    rows["column"] = [PAPER_COLUMNS.get(a, a) for a in rows["attack"]]
    order = {m: i for i, m in enumerate(models)}
    rows = rows.assign(_o=rows["model"].map(order)).sort_values(["_o", "column"], ignore_index=True)
    return rows[columns]


def wide_reported_table(long: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """model x (A_i reported | reproduced | difference): the layout of the poster table."""
    rows = []
    for model in models:
        part = long[long["model"] == model]
        row: dict[str, Any] = {"model": model}
        for _, r in part.iterrows():
            col = r["column"]
            row[f"{col} reported"] = f"{r['reported']:.2f}" if pd.notna(r["reported"]) else "pending"
            row[f"{col} reproduced"] = fmt_mean_std(r["reproduced"] if pd.notna(r["reproduced"]) else None,
                                                    r["std"] if pd.notna(r["std"]) else None)
            row[f"{col} difference"] = f"{r['difference']:+.2f}" if pd.notna(r["difference"]) else "-"
        row["verdicts"] = ", ".join(sorted(set(part["verdict"]))) if len(part) else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def tradeoff_frame(metrics: Sequence[Mapping[str, Any]], model: str, quantizers: Sequence[str],
                   method: str = "BR") -> pd.DataFrame:
    """Accuracy and sparsity against the loss weights; x = w_nat / (w_adv + w_nat)."""
    rows = []
    for m in select(metrics, model=model, quantizer=quantizers, loss=list(DEFAULT_LOSS_WEIGHTS)):
        is_float = V.norm("quantizer", m.get("quantizer")) == V.FLOAT
        if not is_float and V.norm("method", m.get("method")) != V.norm("method", method):
            continue
        w_adv, w_nat = loss_weights(m)
        row = {"run": m["run"], "variant": variant(m.get("quantizer"), m.get("method")), "loss": m["loss"],
               "w_adv": w_adv, "w_nat": w_nat, "natural_share": round(w_nat / (w_adv + w_nat), 4),
               "weights": f"{w_adv:g}:{w_nat:g}"}
        for attack in PAPER_ATTACKS:
            row[attack] = V.get_path(m, f"accuracy.{attack}.mean")
        row["channel_sparsity"] = V.get_path(m, "sparsity.channel")
        row["weight_sparsity"] = V.get_path(m, "sparsity.weight")
        rows.append(row)
    columns = ["run", "variant", "loss", "w_adv", "w_nat", "natural_share", "weights", *PAPER_ATTACKS,
               "channel_sparsity", "weight_sparsity"]
    frame = pd.DataFrame(rows, columns=columns)
    rank = {v: i for i, v in enumerate(variant_order(frame["variant"]))}
    return (frame.assign(_v=frame["variant"].map(rank)).sort_values(["_v", "natural_share"], ignore_index=True)
            .drop(columns="_v"))


def efficiency_frame(metrics: Sequence[Mapping[str, Any]], attack: str = "ifgsm20") -> pd.DataFrame:
    rows = []
    for m in metrics:
        size = m.get("size") or {}
        if not size:
            continue
        rows.append({"run": m["run"], "model": m.get("model"), "variant": variant(m.get("quantizer"), m.get("method")),
                     "quantizer": m.get("quantizer"), "loss": m.get("loss"),
                     "bits_per_weight": size.get("bits_per_quantized_weight"),
                     "packed_KiB": round(size.get("packed_bytes", np.nan) / 1024, 2),
                     "fp32_KiB": round(size.get("fp32_bytes", np.nan) / 1024, 2),
                     "compression": size.get("compression"),
                     "natural": V.get_path(m, "accuracy.natural.mean"),
                     attack: V.get_path(m, f"accuracy.{attack}.mean")})
    return pd.DataFrame(rows, columns=["run", "model", "variant", "quantizer", "loss", "bits_per_weight", "packed_KiB",
                                       "fp32_KiB", "compression", "natural", attack])


def experiment_grid(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(count of runs, names of their losses) per model x variant: which experiments exist."""
    counts = runs.groupby(["model", "variant"]).size().unstack(fill_value=0)
    counts = counts[variant_order(counts.columns)]
    labels = (runs.groupby(["model", "variant"])["loss"].apply(lambda s: "\n".join(sorted(map(str, s))))
              .unstack(fill_value="").reindex_like(counts).fillna(""))
    return counts, labels


def verification_frame(report: Mapping[str, Any], kind: str) -> pd.DataFrame:
    """Rows of reports/verification.json for display: kind 'numeric' or 'qualitative'."""
    from .verify import fmt_reproduced, fmt_verdict

    if kind == "qualitative":
        return pd.DataFrame([{"claim": r["id"], "statement": r["claim"], "evidence": r["detail"],
                              "verdict": fmt_verdict(r)} for r in report.get("qualitative", [])],
                            columns=["claim", "statement", "evidence", "verdict"])
    return pd.DataFrame([{"claim": r["id"], "source": r["source"], "reported": r["reported"],
                          "reproduced": fmt_reproduced(r), "difference": r["difference"], "tolerance": r["tolerance"],
                          "run": r["run"] or "-", "verdict": fmt_verdict(r)} for r in report.get("numeric", [])],
                        columns=["claim", "source", "reported", "reproduced", "difference", "tolerance", "run",
                                 "verdict"])


# --------------------------------------------------------------------------------------------
# Writing tables
# --------------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.2f}"
    if value is None:
        return "-"
    return str(value).replace("\n", " ")


def _md_cell(value: Any) -> str:
    return _text(value).replace("|", "\\|")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no 'tabulate' dependency)."""
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


LATEX_SPECIAL = re.compile(r"([\\&%$#_{}~^])")


def latex_escape(text: str) -> str:
    escaped = LATEX_SPECIAL.sub(lambda mt: {"\\": r"\textbackslash{}", "~": r"\textasciitilde{}",
                                             "^": r"\textasciicircum{}"}.get(mt.group(1), "\\" + mt.group(1)), text)
    return escaped.replace("±", r"$\pm$").replace("|", r"\textbar{}")


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table; cells escaped, floats with 2 decimals."""
    cols = "l" * len(df.columns)
    head = " & ".join(latex_escape(str(c)) for c in df.columns) + r" \\"
    body = [" & ".join(latex_escape(_text(v)) for v in row) + r" \\"
            for row in df.itertuples(index=False)]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
                      rf"\label{{tab:{label}}}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule", head, r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def save_table(df: pd.DataFrame, out_dir: str | Path, name: str, banner_text: str,
               caption: str | None = None) -> list[Path]:
    """tables/<name>.csv (banner as a leading '# ' line: read with comment='#'), .md and .tex."""
    folder = Path(out_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    caption = caption or name
    paths = [folder / f"{name}.csv", folder / f"{name}.md", folder / f"{name}.tex"]
    csv_text = f"# {banner_text}\n" + df.to_csv(index=False, float_format="%.2f")
    md_text = f"*{banner_text}*\n\n{caption}\n\n{to_markdown(df)}\n"
    tex_text = f"% {banner_text}\n" + to_latex(df, f"{caption}. {banner_text}", name)
    for path, text in zip(paths, (csv_text, md_text, tex_text)):
        atomic.write_with(path, lambda p, t=text: p.write_text(t))
    if in_notebook():
        from IPython.display import Markdown, display

        display(Markdown(f"**{caption}**\n\n{to_markdown(df)}" if len(df) else f"**{caption}**: empty"))
    return paths
