"""Which layers train in FP8: DeepSeek-V3 section 3.3.1 ("Mixed precision framework", Figure 6).

The GEMMs of every transformer block's linear layers run in FP8 — the MLA projections (q_proj or q_a_proj /
q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj), the dense FFNs, the shared experts, the routed experts'
grouped GEMMs — and so do the MTP modules' projection M_k (eh_proj) and block. Kept in higher precision, as
the paper does: the embedding, the output head, the MoE gate (Router, fp32 affinities), the norms and the
attention core softmax(QKᵀ)V. Conversion is in place and swaps only how a layer multiplies: every Parameter
stays the same object, so names, dtypes (fp32 master weights) and the state dict are unchanged. ``scaling`` picks
the paper's fine-grained tiles (``blockwise``) or one scale per tensor (``tensorwise``, the baseline it beats).
"""

import torch
from torch import nn

from dsv3.fp8.linear import FP8Linear, _check_backend, _check_scaling, fp8_grouped_mm
from dsv3.model.model import DecoderLayer
from dsv3.model.moe import GroupedExperts


class FP8GroupedExperts(GroupedExperts):
    """GroupedExperts whose grouped GEMMs run per expert in FP8 (``fp8_grouped_mm``); same parameters.

    Made only by ``from_experts``, which re-classes an existing GroupedExperts in place.
    """

    backend: str
    scaling: str

    @classmethod
    def from_experts(cls, experts: GroupedExperts, backend: str = "auto", scaling: str = "blockwise") -> "FP8GroupedExperts":
        if not isinstance(experts, GroupedExperts):
            raise ValueError(f"from_experts needs a GroupedExperts, got {type(experts).__name__}")
        experts.__class__ = cls
        experts.backend = _check_backend(backend)
        experts.scaling = _check_scaling(scaling)
        return experts

    def grouped_matmul(self, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows offsets[i-1]:offsets[i] of x (N, in) times weight[i]^T (out, in) -> (N, out), in FP8."""
        return fp8_grouped_mm(x, weight.transpose(-2, -1), offsets, self.backend, self.scaling)

    def extra_repr(self) -> str:
        return f"backend={self.backend}, scaling={self.scaling}"


def _convert_block(block: DecoderLayer, backend: str, scaling: str) -> None:
    """Every nn.Linear of one block (attention, FFN or shared experts, MTP eh_proj) and its routed experts."""
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FP8Linear | FP8GroupedExperts):
                continue
            if isinstance(child, nn.Linear):
                setattr(parent, name, FP8Linear.from_linear(child, backend, scaling))
            elif isinstance(child, GroupedExperts):
                FP8GroupedExperts.from_experts(child, backend, scaling)


def convert_to_fp8(model: nn.Module, backend: str = "auto", scaling: str = "blockwise") -> nn.Module:
    """Section 3.3: the linear layers of every DecoderLayer in ``model`` (main blocks and MTP modules) become FP8.

    In place and idempotent; ``model`` may be a DSV3ForCausalLM or anything holding one (a LightningModule).
    Embedding, lm_head, router gates, norms and the attention core are left as they are. ``backend``:
    ``auto`` | ``emulated`` | ``scaled_mm`` (dsv3.fp8.linear); ``scaling``: ``blockwise`` | ``tensorwise``.
    """
    _check_backend(backend)
    _check_scaling(scaling)
    blocks = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if not blocks:
        raise ValueError(f"convert_to_fp8 found no DecoderLayer in {type(model).__name__}: pass a DSV3 model")
    for block in blocks:
        _convert_block(block, backend, scaling)
    return model


def fp8_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that run their GEMMs in FP8, in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, FP8Linear | FP8GroupedExperts)]

