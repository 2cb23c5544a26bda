"""The Lightning precision plugin for fine-grained FP8 training (DeepSeek-V3 section 3.3; recipe
``pretrain.precision: fp8-blockwise``, or ``fp8-tensorwise`` for the per-tensor-scaling baseline).

BF16 mixed precision (torch.autocast) for everything the paper keeps in higher precision, and FP8 GEMMs with
1x128 / 128x128 scaling (or one scale per tensor) in the linear layers ``convert_to_fp8`` swaps in at setup.
Lightning's strategies call ``convert_module`` before wrapping the model in DDP and before building the optimizer,
and DDP ignores its return value, so conversion is in place; it keeps every Parameter, so DDP's buckets, the
optimizer, the checkpoint (FP32 master weights under the usual keys) and ``save_pretrained`` are those of an
unconverted run.
"""

from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from dsv3.fp8.convert import convert_to_fp8
from dsv3.fp8.linear import SCALINGS, _check_backend, _check_scaling


def fp8_scaling(precision: str) -> str | None:
    """The FP8 scaling a recipe's ``pretrain.precision`` asks for: ``fp8-blockwise`` -> ``blockwise``,
    ``fp8-tensorwise`` -> ``tensorwise``; None for a precision without FP8 (``bf16-mixed``, ``32-true``, ...)."""
    scaling = precision.removeprefix("fp8-") if precision.startswith("fp8-") else None
    return scaling if scaling in SCALINGS else None


class FP8BlockwisePrecision(MixedPrecision):
    """BF16 autocast plus FP8 linear layers. ``backend``: ``auto`` | ``emulated`` | ``scaled_mm``; ``device``:
    the autocast device type, ``cpu`` or ``cuda``; ``scaling``: ``blockwise`` (the paper's) or ``tensorwise``."""

    def __init__(self, backend: str = "auto", device: str = "cpu", scaling: str = "blockwise"):
        super().__init__("bf16-mixed", device)
        self.backend = _check_backend(backend)
        self.scaling = _check_scaling(scaling)

    def convert_module(self, module: nn.Module) -> nn.Module:
        return convert_to_fp8(module, self.backend, self.scaling)
