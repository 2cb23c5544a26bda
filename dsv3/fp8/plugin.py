"""The Lightning precision plugin for fine-grained FP8 training (DeepSeek-V3 section 3.3; recipe
``pretrain.precision: fp8-blockwise``).

BF16 mixed precision (torch.autocast) for everything the paper keeps in higher precision, and FP8 GEMMs with
1x128 / 128x128 scaling in the linear layers ``convert_to_fp8`` swaps in at setup. Lightning's strategies
call ``convert_module`` before wrapping the model in DDP and before building the optimizer, and DDP ignores its
return value, so conversion is in place; it keeps every Parameter, so DDP's buckets, the optimizer, the
checkpoint (FP32 master weights under the usual keys) and ``save_pretrained`` are those of an unconverted run.
"""

from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from dsv3.fp8.convert import convert_to_fp8
from dsv3.fp8.linear import _check_backend


class FP8BlockwisePrecision(MixedPrecision):
    """BF16 autocast plus FP8 linear layers. ``backend``: ``auto`` | ``emulated`` | ``scaled_mm``; ``device``:
    the autocast device type, ``cpu`` or ``cuda``."""

    def __init__(self, backend: str = "auto", device: str = "cpu"):
        super().__init__("bf16-mixed", device)
        self.backend = _check_backend(backend)

    def convert_module(self, module: nn.Module) -> nn.Module:
        return convert_to_fp8(module, self.backend)
