"""Inference: absorbed MLA decoding over the compressed cache, MTP speculative decoding, streaming generation."""

from dsv3.infer.absorbed import (
    absorb_attention,
    cache_bytes,
    mla_cache_bytes_per_token,
    uses_absorbed_attention,
)
from dsv3.infer.speculative import DecodeResult, greedy_decode, mtp_speculative_decode

__all__ = [
    "DecodeResult",
    "absorb_attention",
    "cache_bytes",
    "greedy_decode",
    "mla_cache_bytes_per_token",
    "mtp_speculative_decode",
    "uses_absorbed_attention",
]
