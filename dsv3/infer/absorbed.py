"""Absorbed MLA decoding over the compressed cache (DeepSeek-V3 report §2.1.1; docs/paper.md, "KV cache").

The absorbed path itself lives in `dsv3.model.attention.MultiHeadLatentAttention` (on by default: every decode
step with a non-empty cache attends against the cached latent with W^UK / W^UV absorbed, so `model.generate`
uses it). This module switches it per model and measures the cache.
"""

import torch
from torch import nn

from dsv3.model.attention import (
    MultiHeadLatentAttention,
    absorb_key_projection,
    absorb_value_projection,
    latent_attention_weights,
)

__all__ = [
    "absorb_attention",
    "absorb_key_projection",
    "absorb_value_projection",
    "cache_bytes",
    "latent_attention_weights",
    "mla_cache_bytes_per_token",
    "uses_absorbed_attention",
]


def absorb_attention(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Decode with absorbed up-projections in every MLA module of `model` (main blocks and MTP modules), or with
    the expanded path everywhere (enabled=False). Parameters, state dict and training are unaffected."""
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.absorb = enabled
    return model


def uses_absorbed_attention(model: nn.Module) -> bool:
    """True when every MLA module of `model` decodes with absorbed up-projections."""
    attns = [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]
    return bool(attns) and all(m.absorb for m in attns)


def cache_bytes(cache) -> int:
    """Bytes of the tensors a DynamicCache holds (keys and values slots of every initialised layer)."""
    return sum(
        layer.keys.nbytes + layer.values.nbytes
        for layer in cache.layers
        if getattr(layer, "is_initialized", False)
    )


def mla_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """(kv_lora_rank + qk_rope_head_dim) × dtype size: the compressed cache of one token in one layer."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * torch.empty((), dtype=dtype).element_size()
