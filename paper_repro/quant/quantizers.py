"""Per-layer weight quantizers (one scale per tensor) and the rule choosing which tensors get one.

Every quantizer is written as integer codes q and one fp32 scale s, with Q(W) = s * q: a single
fp32 multiply. Packing (``quant.packing``) rebuilds tensors with the very same operation, which is
why unpacked weights are bit-identical to deployed ones. Codes are integers, so Q(W) never holds a
negative zero.

Schemes (W has n entries, |W| elementwise, all arithmetic in fp32, result cast back to W's dtype):

- ``binary``:  a = mean(|W|); Q(W) = a * sign(W), sign(0) = 0 (an exact zero stays zero, so a
  tensor with zeros has 3 values; packing then needs 2-bit codes and says so).
  For W without zeros, a is the least-squares scale of sign(W).
- ``ternary``: D = 0.7 * mean(|W|); M = [|W| >= D]; Q(W) = s * M * sign(W) with
  ``scale="ref"`` (default, the reference):  s = sum(|W| M) / n   (averaged over ALL entries), or
  ``scale="twn"``:                            s = sum(|W| M) / sum(M).
  "ref" is not idempotent: reapplying it multiplies s by sum(M)/n.
- ``4bit``:    the reference grid: d = max(|W|)/15; q = 0 if |W| <= d, q = k if
  (2k-1)d < |W| <= (2k+1)d (k = 1..6), q = 7 if |W| > 13d; s = sum(|W| q) / sum(q^2)
  (least squares for fixed q); Q(W) = s * q * sign(W). 15 values; |W| <= max|W|/15 -> exact 0.
- ``kbit`` (``bits`` = b in 2..8): the same construction with L = 2^(b-1) - 1 positive levels:
  d = max(|W|)/(2L+1); q = #{k in 1..L : |W| > (2k-1)d}; s = sum(|W| q)/sum(q^2). It has
  2^b - 1 symmetric uniform values (b = 4 reproduces ``4bit`` exactly; b = 2 is a ternary with
  threshold max|W|/3 and least-squares scale).
- ``none`` (or None): full precision; ``project`` returns a copy of W.

No gradient flows through a quantizer: BinaryRelax applies dL/dU to W directly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import KBIT_MAX, KBIT_MIN, TERNARY_SCALES, quantizer_options  # noqa: F401 - the vocabulary's home

SCHEMES = ("binary", "ternary", "4bit", "kbit")
NONE = "none"
TERNARY_DELTA = 0.7

# (parameter name, owning module, parameter) -> quantize it?
Rule = Callable[[str, nn.Module, Tensor], bool]


def is_none(scheme: str | None) -> bool:
    """True for the full-precision "scheme" (None or "none")."""
    return scheme is None or scheme == NONE


def check_scheme(scheme: str | None, **opts: Any) -> dict[str, Any]:
    """Validate a scheme and its options; return the options with defaults filled in (config.quantizer_options:
    the same check runs when params are loaded)."""
    return quantizer_options(scheme, opts)


def _positive_levels(scheme: str, opts: dict[str, Any]) -> int:
    """L: the largest |code| of a scheme."""
    if scheme in ("binary", "ternary"):
        return 1
    if scheme == "4bit":
        return 7
    return 2 ** (opts["bits"] - 1) - 1


def levels(scheme: str | None, **opts: Any) -> int | None:
    """Maximum number of distinct values of Q(W) (binary: 2, plus 0 if W has exact zeros)."""
    opts = check_scheme(scheme, **opts)
    if is_none(scheme):
        return None
    if scheme == "binary":
        return 2
    return 2 * _positive_levels(scheme, opts) + 1


def nominal_bits(scheme: str | None, **opts: Any) -> int | None:
    """Code width the scheme is designed for (binary 1, ternary 2, 4bit 4, kbit b); None for none."""
    opts = check_scheme(scheme, **opts)
    if is_none(scheme):
        return None
    return {"binary": 1, "ternary": 2, "4bit": 4}.get(scheme, opts.get("bits"))


def _sign_codes(w: Tensor) -> Tensor:
    return (w > 0).to(torch.int8) - (w < 0).to(torch.int8)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (an all-zero tensor quantizes to zeros)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _binary(w: Tensor) -> tuple[Tensor, Tensor]:
    return _sign_codes(w), w.abs().mean()


def _ternary(w: Tensor, scale: str) -> tuple[Tensor, Tensor]:
    a = w.abs()
    mask = a >= TERNARY_DELTA * a.mean()
    kept = (a * mask).sum()
    s = kept / w.numel() if scale == "ref" else _safe_div(kept, mask.sum().to(torch.float32))
    return _sign_codes(w) * mask.to(torch.int8), s


def _uniform(w: Tensor, n_levels: int) -> tuple[Tensor, Tensor]:
    a = w.abs()
    d = a.amax() / (2 * n_levels + 1)
    odd = torch.arange(1, 2 * n_levels, 2, device=w.device, dtype=torch.float32)
    q = torch.bucketize(a.contiguous(), d * odd)  # number of thresholds (2k-1)d strictly below |W|
    qf = q.to(torch.float32)
    scale = _safe_div((a * qf).sum(), (qf * qf).sum())
    return _sign_codes(w) * q.to(torch.int8), scale


def quantize_codes(w: Tensor, scheme: str, **opts: Any) -> tuple[Tensor, Tensor]:
    """Integer codes (int8, shape of w) and fp32 0-d scale with Q(W) = scale * codes."""
    opts = check_scheme(scheme, **opts)
    if is_none(scheme):
        raise ValueError("the 'none' scheme has no codes")
    with torch.no_grad():
        w32 = w.detach().to(torch.float32)
        if scheme == "binary":
            return _binary(w32)
        if scheme == "ternary":
            return _ternary(w32, opts["scale"])
        return _uniform(w32, _positive_levels(scheme, opts))


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """scale * codes in fp32 (the one operation both projection and unpacking use), cast to dtype."""
    return (scale.to(torch.float32) * codes.to(torch.float32)).to(dtype)


def project(w: Tensor, scheme: str | None, **opts: Any) -> Tensor:
    """Q(w) as a new tensor of w's dtype and device (w is never modified); see the module docstring."""
    if is_none(scheme):
        check_scheme(scheme, **opts)
        return w.detach().clone()
    codes, scale = quantize_codes(w, scheme, **opts)
    return dequantize(codes, scale, w.dtype)


def reference_rule(name: str, module: nn.Module, param: Tensor) -> bool:
    """The reference selection: the weight of every 3x3 conv (stem included); 1x1, fc, BN stay float."""
    return (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (3, 3)
        and param is module.weight
    )


def select_quantized(model: nn.Module, rule: Rule | None = None) -> list[str]:
    """Names (as in model.named_parameters()) of the parameters to quantize, in model order."""
    rule = rule or reference_rule
    names: list[str] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(param) not in seen and rule(full, module, param):
                names.append(full)
            seen.add(id(param))
    return names


def selection_report(model: nn.Module, names: list[str]) -> dict[str, Any]:
    """Which parameters are quantized and which stay float, with shapes and counts."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"not parameters of the model: {missing}")
    chosen = set(names)
    rows = {
        key: [{"name": n, "shape": list(p.shape), "numel": p.numel()}
              for n, p in params.items() if (n in chosen) == want]
        for key, want in (("quantized", True), ("float", False))
    }
    n_q = sum(r["numel"] for r in rows["quantized"])
    n_f = sum(r["numel"] for r in rows["float"])
    return {
        **rows,
        "n_quantized_tensors": len(rows["quantized"]),
        "n_quantized_weights": n_q,
        "n_float_weights": n_f,
        "quantized_share": 100.0 * n_q / max(n_q + n_f, 1),
    }
