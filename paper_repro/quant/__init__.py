"""Weight quantization: quantizers, BinaryRelax/BinaryConnect, sparsity, size and packed export.

Full precision is ``scheme=None`` (or ``"none"``): ``project`` copies, ``BinaryRelax`` selects no
tensor and its contexts are no-ops, so one training loop serves every run.
"""

from .packing import (
    NotRepresentable,
    infer_codes,
    load_packed,
    pack,
    save_packed,
    size_report,
    unpack,
)
from .quantizers import (
    SCHEMES,
    check_scheme,
    dequantize,
    is_none,
    levels,
    nominal_bits,
    project,
    quantize_codes,
    reference_rule,
    select_quantized,
    selection_report,
)
from .relax import METHODS, BinaryRelax
from .sparsity import layer_table, parameter_names, summary

__all__ = [
    "METHODS", "SCHEMES", "BinaryRelax", "NotRepresentable", "check_scheme", "dequantize", "infer_codes",
    "is_none", "layer_table", "levels", "load_packed", "nominal_bits", "pack", "parameter_names", "project",
    "quantize_codes", "reference_rule", "save_packed", "select_quantized", "selection_report", "size_report",
    "summary", "unpack",
]
