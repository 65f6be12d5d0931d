"""Packed export of a deployed model and its size, both derived from the actual tensors.

A quantized tensor T is stored as one fp32 scale s and integer codes q with T == s * q bit for bit
(the multiply ``quantizers.dequantize`` uses). s and q are inferred from T itself: the distinct
magnitudes must all be exact multiples s*q of one scale with |q| <= 127, else the tensor is not
representable and packing fails. The code width is the smallest that holds the observed codes:
1 bit when q is only -1/+1 ("sign" code: bit = q > 0), otherwise b = ceil(log2(2 max|q| + 1))
bits with code q + 2^(b-1) - 1 ("offset" code). Codes are bit-packed little-endian into uint8.
A binary tensor with exact zeros (sign(0) = 0) therefore takes 2-bit codes; that is reported as
a fallback. Every other tensor is stored unchanged (float tensors at their dtype, fp32 for our
models).

File: one safetensors file with ``<name>::codes`` (uint8) and ``<name>::scale`` (fp32, shape [1])
for quantized tensors, ``<name>`` for the rest, and a JSON header in the safetensors metadata
under ``paper_repro.packed``. Written to a temp name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .quantizers import check_scheme, dequantize, is_none, nominal_bits
from .sparsity import is_bn_stat

FORMAT = "paper_repro.packed"
VERSION = 1
HEADER_KEY = "paper_repro.packed"
MAX_CODE = 127  # |q| limit (8-bit codes)
_SCALE_TRIES_ULPS = 2


class NotRepresentable(ValueError):
    """The tensor is not s * q for one fp32 scale and small integer codes (or not in its scheme)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in packed header")
    return dtype


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _scale_candidates(m0: Tensor, k: int) -> list[Tensor]:
    """m0 / k and its nearest fp32 neighbours (the division may be off by an ulp from the true s)."""
    base = m0 / k
    out, up, down = [base], base, base
    for _ in range(_SCALE_TRIES_ULPS):
        up = torch.nextafter(up, torch.tensor(math.inf))
        down = torch.nextafter(down, torch.tensor(0.0))
        out += [up, down]
    return out


def _find_scale(mags: Tensor) -> Tensor | None:
    """Smallest-code fp32 scale s with s * round(m / s) == m for every distinct magnitude m > 0."""
    m0 = mags[0]
    for k in range(1, MAX_CODE + 1):
        for s in _scale_candidates(m0, k):
            if s <= 0:
                continue
            q = torch.round(mags / s)
            if q.max() <= MAX_CODE and q.min() >= 1 and torch.equal(s * q, mags):
                return s
    return None


def infer_codes(t: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 codes, fp32 0-d scale) with dequantize(codes, scale) bit-identical to t in fp32."""
    x = t.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise NotRepresentable("tensor has non-finite values")
    mags = torch.unique(x.abs().cpu())
    mags = mags[mags > 0]
    if mags.numel() > MAX_CODE:
        raise NotRepresentable(f"{mags.numel()} distinct magnitudes (more than {MAX_CODE})")
    scale = torch.zeros((), dtype=torch.float32) if mags.numel() == 0 else _find_scale(mags)
    if scale is None:
        raise NotRepresentable("magnitudes are not integer multiples of one fp32 scale")
    scale = scale.to(x.device)
    codes = (torch.round(x / scale) if mags.numel() else torch.zeros_like(x)).to(torch.int8)
    if not _bitwise_equal(dequantize(codes, scale), x):
        raise NotRepresentable("s * q does not reproduce the tensor bit for bit (negative zeros?)")
    return codes, scale


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes (< 2^bits) into uint8, little-endian bits, zero padding at the end."""
    c = codes.reshape(-1).to(torch.uint8)
    shifts = torch.arange(bits, device=c.device, dtype=torch.uint8)
    stream = ((c.unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    weights = torch.arange(8, device=c.device, dtype=torch.uint8)
    return (stream.reshape(-1, 8) << weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_bits: n codes as int32."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[: n * bits].reshape(n, bits)
    weights = torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream.to(torch.int32) << weights).sum(dim=1, dtype=torch.int32)


def encode(t: Tensor, scheme: str, **opts: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Arrays (codes, scale) and header entry of one quantized tensor, checked against its scheme."""
    opts = check_scheme(scheme, **opts)
    codes, scale = infer_codes(t)
    q_max = int(codes.abs().max()) if codes.numel() else 0
    has_zero = bool((codes == 0).any())
    if q_max == 1 and not has_zero:
        bits, code, offset = 1, "sign", 0
        unsigned = codes > 0
    else:
        bits = max(1, math.ceil(math.log2(2 * q_max + 1)))
        code, offset = "offset", 2 ** (bits - 1) - 1
        unsigned = codes.to(torch.int16) + offset
    declared = nominal_bits(scheme, **opts)
    fallback = None
    if bits > declared:
        if scheme == "binary" and q_max == 1:
            fallback = "binary tensor has exact zeros (sign(0) = 0): stored with 2-bit codes"
        else:
            raise NotRepresentable(f"needs {bits}-bit codes, more than {scheme!r} allows ({declared})")
    arrays = {"codes": pack_bits(unsigned, bits), "scale": scale.reshape(1)}
    entry = {
        "kind": "quantized", "scheme": scheme, "opts": opts, "bits": bits, "code": code, "offset": offset,
        "shape": list(t.shape), "numel": t.numel(), "dtype": _dtype_name(t.dtype),
        "n_values": int(torch.unique(codes).numel()), "fallback": fallback,
    }
    return arrays, entry


def decode(codes: Tensor, scale: Tensor, entry: Mapping[str, Any]) -> Tensor:
    """Rebuild one quantized tensor from its packed codes, scale and header entry."""
    n = int(entry["numel"])
    c = unpack_bits(codes, int(entry["bits"]), n)
    q = 2 * c - 1 if entry["code"] == "sign" else c - int(entry["offset"])
    return dequantize(q, scale.reshape(()), _dtype(entry["dtype"])).reshape(entry["shape"])


def pack(
    tensors: Mapping[str, Tensor], names: list[str], scheme: str | None, **opts: Any
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Packed arrays and JSON-able header of a deployed state dict; ``names`` are the quantized ones."""
    if is_none(scheme) and names:
        raise ValueError("scheme 'none' cannot have quantized tensors")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"quantized names not in tensors: {missing}")
    chosen = set(names)
    arrays: dict[str, Tensor] = {}
    entries: dict[str, Any] = {}
    for name, t in tensors.items():
        if name in chosen:
            try:
                parts, entries[name] = encode(t, scheme, **opts)
            except NotRepresentable as err:
                raise NotRepresentable(f"{name}: {err}") from err
            arrays[f"{name}::codes"], arrays[f"{name}::scale"] = parts["codes"], parts["scale"]
        else:
            arrays[name] = t.detach()
            entries[name] = {"kind": "float" if t.is_floating_point() else "raw", "dtype": _dtype_name(t.dtype),
                             "shape": list(t.shape)}
    header = {"format": FORMAT, "version": VERSION, "bit_order": "little",
              "scheme": None if is_none(scheme) else scheme, "opts": check_scheme(scheme, **opts),
              "tensors": entries}
    return arrays, header


def unpack(arrays: Mapping[str, Tensor], header: Mapping[str, Any]) -> dict[str, Tensor]:
    """The deployed state dict back from ``pack``'s output (bit-identical), in the original order."""
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT} v{VERSION} header: {header.get('format')!r} v{header.get('version')!r}")
    out: dict[str, Tensor] = {}
    for name, entry in header["tensors"].items():
        if entry["kind"] == "quantized":
            out[name] = decode(arrays[f"{name}::codes"], arrays[f"{name}::scale"], entry)
        else:
            out[name] = arrays[name]
    return out


def size_report(tensors: Mapping[str, Tensor], names: list[str], scheme: str | None, **opts: Any) -> dict[str, Any]:
    """Bits per quantized weight, packed and fp32 bytes, compression, all from the packed tensors.

    Counted like the paper's parameter count: quantized codes (padded to whole bytes) + one fp32
    scale per quantized tensor + the other parameters as fp32. BN running statistics are stored in
    the packed file but counted apart (``buffer_bytes``); integer buffers are ignored.
    """
    arrays, header = pack(tensors, names, scheme, **opts)
    layers, fallbacks = [], []
    code_bytes = scale_bytes = q_weights = code_bits = float_weights = buffer_weights = 0
    for name, entry in header["tensors"].items():
        if entry["kind"] == "quantized":
            nbytes = arrays[f"{name}::codes"].numel()
            code_bytes += nbytes
            scale_bytes += 4
            q_weights += entry["numel"]
            code_bits += entry["bits"] * entry["numel"]
            layers.append({"name": name, "bits": entry["bits"], "numel": entry["numel"], "code_bytes": nbytes,
                           "n_values": entry["n_values"], "fallback": entry["fallback"]})
            if entry["fallback"]:
                fallbacks.append({"name": name, "reason": entry["fallback"]})
        elif entry["kind"] == "float":
            n = math.prod(entry["shape"])
            if is_bn_stat(name):
                buffer_weights += n
            else:
                float_weights += n
    packed = code_bytes + scale_bytes + 4 * float_weights
    fp32 = 4 * (q_weights + float_weights)
    return {
        "bits_per_quantized_weight": code_bits / q_weights if q_weights else 32.0,
        "packed_bytes": packed, "fp32_bytes": fp32, "compression": fp32 / packed if packed else 1.0,
        "code_bytes": code_bytes, "scale_bytes": scale_bytes, "float_bytes": 4 * float_weights,
        "buffer_bytes": 4 * buffer_weights,
        "quantized_weights": q_weights, "float_weights": float_weights,
        "quantized_share": 100.0 * q_weights / (q_weights + float_weights) if q_weights + float_weights else 0.0,
        "layers": layers, "fallbacks": fallbacks,
    }


def _atomic_target(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def save_packed(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], names: list[str], scheme: str | None,
    meta: Mapping[str, Any] | None = None, **opts: Any,
) -> dict[str, Any]:
    """Write the packed deployed model atomically; returns the header (with ``file_bytes``)."""
    path = Path(path)
    arrays, header = pack(tensors, names, scheme, **opts)
    header["meta"] = dict(meta or {})
    cpu = {k: v.detach().contiguous().cpu() for k, v in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    try:
        save_file(cpu, tmp, metadata={HEADER_KEY: json.dumps(header)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {**header, "file_bytes": path.stat().st_size}


def load_packed(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a packed file: (deployed state dict, header)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        if HEADER_KEY not in metadata:
            raise ValueError(f"{path} has no {HEADER_KEY!r} header")
        header = json.loads(metadata[HEADER_KEY])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    return unpack(arrays, header), header
