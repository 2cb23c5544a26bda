"""Fine-grained FP8 training (DeepSeek-V3 section 3.3): blockwise quantisation and FP8 linear layers."""

from dsv3.fp8.linear import (
    FP8GroupedMMFunction,
    FP8Linear,
    FP8LinearFunction,
    fp8_grouped_mm,
    fp8_mm,
    resolve_backend,
    scaled_mm_supported,
)
from dsv3.fp8.quant import E4M3_MAX, block_scale, dequantize_blockwise, quantize_blockwise

__all__ = [
    "E4M3_MAX",
    "FP8GroupedMMFunction",
    "FP8Linear",
    "FP8LinearFunction",
    "block_scale",
    "dequantize_blockwise",
    "fp8_grouped_mm",
    "fp8_mm",
    "quantize_blockwise",
    "resolve_backend",
    "scaled_mm_supported",
]
