"""Weight, channel and filter sparsity of (deployed) tensors, per layer and in total.

Definitions (paper-spec section 7); all percentages are in %:
- weight sparsity: share of exact zeros among the quantized weights;
- channel sparsity (the authors' script): over all quantized conv kernels G[out, in, kh, kw], the
  input channels k with G[:, k, :, :] entirely zero, divided by the number of (layer, input
  channel) pairs;
- filter sparsity: the same for output filters G[k, :, :, :];
- model weight sparsity: exact zeros among all parameters (BN running statistics excluded).
``l2_tol`` switches channels/filters to the sibling paper's rule (l2 norm below ``l2_tol``, they
used 1e-15) instead of "entirely zero".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# Buffers of BatchNorm: stored with the model but not parameters (the paper's count excludes them).
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_stat(name: str) -> bool:
    """True for BatchNorm running statistics (buffers, not weights)."""
    return name.rsplit(".", 1)[-1] in BN_STATS


def parameter_names(tensors: Mapping[str, Tensor]) -> list[str]:
    """Floating-point tensors that are parameters, judged by name (BN running stats excluded)."""
    return [n for n, t in tensors.items() if t.is_floating_point() and not is_bn_stat(n)]


def _zero_slices(t: Tensor, dim: int, l2_tol: float | None) -> tuple[int, int]:
    """(number of all-zero slices along dim, number of slices) of a tensor with ndim >= 2."""
    other = [d for d in range(t.ndim) if d != dim]
    if l2_tol is None:
        zero = ~(t != 0).any(dim=other) if other else t == 0
    else:
        zero = torch.linalg.vector_norm(t.double(), dim=other) < l2_tol
    return int(zero.sum()), t.shape[dim]


def _pct(part: int, total: int) -> float:
    return 100.0 * part / total if total else 0.0


def layer_row(name: str, t: Tensor, l2_tol: float | None = None) -> dict[str, Any]:
    """One row of the per-layer table (channel/filter entries None for tensors with ndim < 2)."""
    t = t.detach()
    numel = t.numel()
    nnz = int(torch.count_nonzero(t))
    row: dict[str, Any] = {
        "name": name, "shape": list(t.shape), "numel": numel, "nnz": nnz,
        "weight_sparsity": _pct(numel - nnz, numel),
        "channel_sparsity": None, "filter_sparsity": None,
        "zero_channels": None, "n_channels": None, "zero_filters": None, "n_filters": None,
        "levels": int(torch.unique(t).numel()),
    }
    if t.ndim >= 2:
        zc, nc = _zero_slices(t, 1, l2_tol)
        zf, nf = _zero_slices(t, 0, l2_tol)
        row.update(zero_channels=zc, n_channels=nc, channel_sparsity=_pct(zc, nc),
                   zero_filters=zf, n_filters=nf, filter_sparsity=_pct(zf, nf))
    return row


def layer_table(tensors: Mapping[str, Tensor], names: list[str], l2_tol: float | None = None) -> list[dict[str, Any]]:
    """Per-layer rows (Distiller-style) for the named tensors, in the given order."""
    return [layer_row(n, tensors[n], l2_tol) for n in names]


def summary(tensors: Mapping[str, Tensor], names: list[str], l2_tol: float | None = None) -> dict[str, Any]:
    """Totals over the quantized tensors ``names`` and over the whole model, plus the layer table.

    Channel and filter sparsity aggregate only 4-D (conv) kernels among ``names``, as the authors did.
    """
    layers = layer_table(tensors, names, l2_tol)
    convs = [r for r in layers if len(r["shape"]) == 4]
    n_w = sum(r["numel"] for r in layers)
    z_w = sum(r["numel"] - r["nnz"] for r in layers)
    n_c = sum(r["n_channels"] for r in convs)
    z_c = sum(r["zero_channels"] for r in convs)
    n_f = sum(r["n_filters"] for r in convs)
    z_f = sum(r["zero_filters"] for r in convs)
    params = parameter_names(tensors)
    n_m = sum(tensors[n].numel() for n in params)
    z_m = sum(tensors[n].numel() - int(torch.count_nonzero(tensors[n])) for n in params)
    return {
        "weight": _pct(z_w, n_w), "channel": _pct(z_c, n_c), "filter": _pct(z_f, n_f),
        "model_weight": _pct(z_m, n_m),
        "counts": {
            "quantized_weights": n_w, "zero_quantized_weights": z_w,
            "channels": n_c, "zero_channels": z_c, "filters": n_f, "zero_filters": z_f,
            "model_weights": n_m, "zero_model_weights": z_m,
        },
        "channel_rule": "all zero" if l2_tol is None else f"l2 norm < {l2_tol:g}",
        "layers": layers,
    }
