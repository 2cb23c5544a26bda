"""Regional compilation (recipe switch `pretrain.compile`): every transformer block — the main model's decoder
blocks and the MTP modules' blocks — compiled in place with torch.compile, as torchtitan compiles its models.

Why per block and not the whole model: the blocks are where the time goes (attention, the MoE dispatch, the
SwiGLU experts) and they repeat, so one compiled graph per kind of block (dense, MoE, MTP) serves every layer of
that kind: compile time stays that of a few blocks whatever the depth, while the embedding, the head, the loss
and the MTP bookkeeping stay eager. What compiling buys: the elementwise work between the GEMMs (RMSNorm, RoPE,
SiLU·up, routing, gate scaling) fused into a few kernels instead of one pass over memory each.

`Module.compile` compiles in place: the module stays what it was (no `_orig_mod` wrapper), so parameter names,
state dicts, checkpoints and `save_pretrained` folders are those of an eager model, and a checkpoint written with
compile on resumes with it off and back. The MoE dispatch has no data-dependent shape (dsv3/model/moe.py), so a
block does not recompile when the tokens per expert change from step to step; it compiles again only for a new
kind of call (training vs evaluation, another batch shape).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from dsv3.model.model import DecoderLayer

# Entries one block's code may hold: every block runs the same forward code, whose compiled versions dynamo keeps
# together, one per kind of block (dense, MoE, MTP) × grad mode (training, no_grad validation, inference_mode
# validation) × shape specialisation (static, then dynamic after a shape change): up to 18, against dynamo's
# default of 8, past which it would silently run the rest eagerly.
RECOMPILE_LIMIT = 32


def compiled_blocks(model: nn.Module) -> list[DecoderLayer]:
    """The blocks of `model` that `compile_blocks` has compiled (in module order)."""
    return [m for m in model.modules() if isinstance(m, DecoderLayer) and m._compiled_call_impl is not None]


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """Compile every DecoderLayer of `model` (main blocks and MTP modules) in place with torch.compile; returns
    `model`. `options` go to torch.compile (e.g. mode="max-autotune", backend="aot_eager"). Idempotent; a model
    without DecoderLayers is refused. Compilation itself happens at each block's first call."""
    blocks = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    if not blocks:
        raise ValueError(f"compile_blocks found no DecoderLayer in {type(model).__name__}: pass a DSV3 model")
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # torch 2.13: a limit per compile call
        options.setdefault("recompile_limit", RECOMPILE_LIMIT)
    else:  # older torch: dynamo's global limit (named cache_size_limit before torch 2.7)
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
    for block in blocks:
        if block._compiled_call_impl is None:
            block.compile(**options)
    return model


__all__ = ["compile_blocks", "compiled_blocks"]
