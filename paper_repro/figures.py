"""The notebooks' figures (``from paper_repro import figures as F``): the weight values behind the
histograms (runs/<run>/*.safetensors, or a published bundle's packed file) and saving a figure as PNG +
PDF with the provenance banner printed under it. The plotting style is set by notebook.notebook_setup.

Why: a figure that leaves the notebook must still say which profile and data it shows, and whether
it is comparable with the paper; histograms read the weights the metrics were measured on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import atomic
from .notebook import NOT_COMPARABLE, in_notebook, read_json

MAX_HIST_VALUES = 200_000


# --------------------------------------------------------------------------------------------
# Weights (for histograms)
# --------------------------------------------------------------------------------------------

def load_weights(runs_dir: str | Path, run: str, kind: str = "deployed") -> dict[str, np.ndarray] | None:
    """runs/<run>/<kind>.safetensors as numpy arrays; in a published bundle (runs_dir = its models/ folder)
    the deployed weights come from the packed <run>.safetensors. None when absent."""
    path = Path(runs_dir) / run / f"{kind}.safetensors"
    packed = Path(runs_dir) / f"{run}.safetensors"
    if not path.is_file():
        if kind != "deployed" or not packed.is_file():
            return None
        from .quant import load_packed

        tensors, _ = load_packed(packed)
        return {k: v.numpy() for k, v in tensors.items()}
    from safetensors.numpy import load_file

    return load_file(str(path))


def quantized_names(runs_dir: str | Path, run: str, tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Names listed as quantized in deployed.json (or the packed header of a bundle), else every 3x3 conv kernel."""
    sidecar = read_json(Path(runs_dir) / run / "deployed.json") or {}
    listed = list(sidecar.get("quantized") or [])
    packed = Path(runs_dir) / f"{run}.safetensors"
    if not listed and packed.is_file():
        from safetensors import safe_open

        from .quant.packing import HEADER_KEY

        with safe_open(str(packed), framework="numpy") as f:
            header = json.loads((f.metadata() or {}).get(HEADER_KEY, "{}"))
        listed = [n for n, e in (header.get("tensors") or {}).items() if e.get("kind") == "quantized"]
    names = [n for n in listed if n in tensors]
    return names or [n for n, t in tensors.items() if t.ndim == 4 and t.shape[2:] == (3, 3)]


def weight_values(runs_dir: str | Path, metrics: Sequence[Mapping[str, Any]], kind: str,
                  normalise: bool = False, seed: int = 0) -> pd.DataFrame:
    """Long frame (run, quantizer, loss, value) of quantized-layer weights; deployed weights can be
    divided by each layer's max |Q| so levels of different layers line up."""
    rng = np.random.default_rng(seed)
    parts = []
    for m in metrics:
        tensors = load_weights(runs_dir, m["run"], kind)
        if tensors is None:
            continue
        names = quantized_names(runs_dir, m["run"], tensors)
        vals = []
        for n in names:
            t = tensors[n].astype(np.float64).ravel()
            peak = np.abs(t).max()
            vals.append(t / peak if normalise and peak > 0 else t)
        if not vals:
            continue
        values = np.concatenate(vals)
        if values.size > MAX_HIST_VALUES:
            values = rng.choice(values, MAX_HIST_VALUES, replace=False)
        parts.append(pd.DataFrame({"run": m["run"], "quantizer": m.get("quantizer"), "loss": m.get("loss"),
                                   "value": values}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run", "quantizer", "loss", "value"])


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def save_figure(fig, out_dir: str | Path, name: str, banner_text: str) -> list[Path]:
    """figures/<name>.png and .pdf, with the banner printed under the plot; shown, then closed."""
    import matplotlib.pyplot as plt

    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    color = "firebrick" if NOT_COMPARABLE in banner_text else "dimgray"
    fig.canvas.draw()  # settle the layout so the banner goes below every label
    bottom = fig.get_tightbbox(fig.canvas.get_renderer()).y0 / fig.get_figheight()
    fig.text(0.005, min(bottom, 0.0) - 0.01, banner_text, fontsize=7, color=color, ha="left", va="top")
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    atomic.write_with(paths[0], lambda p: fig.savefig(p, dpi=150, bbox_inches="tight", format="png"))
    atomic.write_with(paths[1], lambda p: fig.savefig(p, bbox_inches="tight", format="pdf", metadata={"CreationDate": None}))
    plt.close(fig)
    if in_notebook():
        from IPython.display import Image, display

        display(Image(filename=str(paths[0])))
    return paths
