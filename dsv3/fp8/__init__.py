"""Fine-grained FP8 training (DeepSeek-V3 section 3.3): blockwise quantisation, FP8 linear layers, model
conversion, BF16 optimizer moments and the Lightning precision plugin; per-tensor scaling as the baseline."""

from dsv3.fp8.convert import FP8GroupedExperts, convert_to_fp8, fp8_modules
from dsv3.fp8.linear import (
    FP8GroupedMMFunction,
    FP8Linear,
    FP8LinearFunction,
    fp8_grouped_mm,
    fp8_mm,
    resolve_backend,
    scaled_mm_supported,
    tensorwise_scaled_mm_supported,
)
from dsv3.fp8.optim import AdamWBF16Moments
from dsv3.fp8.plugin import FP8BlockwisePrecision, fp8_scaling
from dsv3.fp8.quant import E4M3_MAX, TENSOR, block_scale, dequantize_blockwise, quantize_blockwise

__all__ = [
    "AdamWBF16Moments",
    "FP8BlockwisePrecision",
    "FP8GroupedExperts",
    "E4M3_MAX",
    "TENSOR",
    "FP8GroupedMMFunction",
    "FP8Linear",
    "FP8LinearFunction",
    "block_scale",
    "convert_to_fp8",
    "dequantize_blockwise",
    "fp8_grouped_mm",
    "fp8_mm",
    "fp8_scaling",
    "fp8_modules",
    "quantize_blockwise",
    "resolve_backend",
    "scaled_mm_supported",
    "tensorwise_scaled_mm_supported",
]
