"""What every notebook shares (``from paper_repro import notebook as N``): its parameters, the runs it
shows (selected, sorted, labelled), the provenance banner, its setup and its display. The tables are
built in tables.py (``R``), the figures saved by figures.py (``F``).

Why: every output names its profile and data provenance, and says "NOT COMPARABLE WITH THE PAPER"
when the data are not the official archive or the profile is not "paper" (or a run's recipe is not
the paper's); that decision is made here once, for every table and figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import verdicts as V

NOT_COMPARABLE = V.NOT_COMPARABLE_BANNER
NOT_RUN = "not run in this profile"
QUANT_ORDER = ("none", "binary", "ternary", "4bit", "kbit")
LOSS_ORDER = ("natural", "pgd_at", "tradeoff", "trades")
METHOD_ORDER = ("none", "br", "bc")


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

def as_list(value: str | Sequence[str] | None) -> list[str]:
    """Notebook list parameters arrive as "a,b,c" (papermill -p) or as lists (-y / -f)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def read_json(path: str | Path | None) -> dict[str, Any] | None:
    """A JSON file, or None when it does not exist (inputs of small profiles may be absent)."""
    if not path or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------------------------
# Runs: select, sort, label
# --------------------------------------------------------------------------------------------

def variant(quantizer: str | None, method: str | None) -> str:
    """Display label: 'fp32' for float models, else e.g. 'ternary BR'."""
    if V.norm("quantizer", quantizer) in (None, V.FLOAT):
        return "fp32"
    return f"{quantizer} {str(method or '').upper()}".strip()


def select(metrics: Iterable[Mapping[str, Any]], **fields: Any) -> list[Mapping[str, Any]]:
    """Runs whose metrics fields equal the given ones; a list/tuple value means 'one of'."""
    out = []
    for m in metrics:
        ok = True
        for key, want in fields.items():
            wants = want if isinstance(want, (list, tuple, set)) else [want]
            if V.norm(key, m.get(key)) not in {V.norm(key, w) for w in wants}:
                ok = False
        if ok:
            out.append(m)
    return out


def ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """The distinct values, those in ``preferred`` first (in its order), then the others sorted."""
    values = list(dict.fromkeys(values))
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def variant_order(variants: Iterable[str]) -> list[str]:
    """fp32 first, then binary, ternary, 4bit, each BR before BC."""
    preferred = ["fp32"] + [f"{q} {m}" for q in QUANT_ORDER[1:] for m in ("BR", "BC")]
    return ordered(variants, preferred)


def sort_runs(metrics: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Model, quantizer (fp first), method, loss (natural, pgd_at, tradeoff), run name."""
    def key(m: Mapping[str, Any]) -> tuple:
        q, loss = V.norm("quantizer", m.get("quantizer")), m.get("loss")
        method = V.norm("method", m.get("method"))
        return (str(m.get("model")), QUANT_ORDER.index(q) if q in QUANT_ORDER else 99,
                METHOD_ORDER.index(method) if method in METHOD_ORDER else 99,
                LOSS_ORDER.index(loss) if loss in LOSS_ORDER else 99, str(m.get("run")))
    return sorted(metrics, key=key)


# --------------------------------------------------------------------------------------------
# Provenance banner
# --------------------------------------------------------------------------------------------

def provenance(metrics: Sequence[Mapping[str, Any]], data_meta: str | Path | Mapping | None = None,
               profile: str | None = None) -> dict[str, Any]:
    """What every output must state: profile(s), data source, official or not, comparability."""
    meta = data_meta if isinstance(data_meta, Mapping) else read_json(data_meta)
    profiles = sorted({str(m.get("profile")) for m in metrics})
    sources = sorted({str((m.get("data") or {}).get("source")) for m in metrics})
    official = [V.is_official(m) for m in metrics]
    if meta is not None and "official" in meta:
        official.append(bool(meta["official"]))
        sources = sorted(set(sources) | {str(meta.get("source"))}) if meta.get("source") else sources
    comparable = (bool(metrics) and all(official) and profile in (None, "paper")
                  and all(V.is_comparable(m) for m in metrics))  # the recipe in effect, not only labels
    return {"profile": profile, "metrics_profiles": profiles, "data_sources": sources,
            "official": bool(official) and all(official), "n_runs": len(metrics), "comparable": comparable}


def banner(metrics: Sequence[Mapping[str, Any]], data_meta: str | Path | Mapping | None = None,
           profile: str | None = None) -> str:
    """One line stating profile and data provenance, ending in NOT COMPARABLE... when it is not."""
    p = provenance(metrics, data_meta, profile)
    text = (f"profile: {p['profile'] or '-'} (metrics: {', '.join(p['metrics_profiles']) or 'none'}) | "
            f"data: {', '.join(p['data_sources']) or 'unknown'}, official={p['official']} | runs: {p['n_runs']}")
    return text if p["comparable"] else f"{text} | {NOT_COMPARABLE}"


# --------------------------------------------------------------------------------------------
# Setup and display
# --------------------------------------------------------------------------------------------

def notebook_setup(metrics_dir: str | Path, data_meta: str | Path | None, profile: str | None
                   ) -> tuple[list[dict[str, Any]], str]:
    """What every notebook does first: plotting style, the runs (sorted) and the provenance banner, shown."""
    setup_plotting()
    metrics = sort_runs(V.load_metrics(metrics_dir))
    text = banner(metrics, data_meta, profile)
    show_banner(text)
    return metrics, text


def setup_plotting() -> None:
    """Agg backend (figures are shown in notebooks as the saved PNG) and one seaborn theme."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")


def in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell and hasattr(shell, "get_ipython") else None
    return ip is not None and getattr(ip, "kernel", None) is not None


def show_markdown(text: str) -> None:
    if in_notebook():
        from IPython.display import Markdown, display

        display(Markdown(text))
    else:
        print(text)


def show_banner(text: str) -> None:
    show_markdown(f"**{text}**" if NOT_COMPARABLE in text else text)


def show_not_run(what: str) -> None:
    show_markdown(f"*{what}: {NOT_RUN}.*")
