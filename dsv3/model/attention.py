"""Multi-head Latent Attention (MLA), DeepSeek-V3 report §2.1.1, eqs. 1-11.

Keys and values are compressed into one latent c_KV per token (eq. 1); a single RoPE key shared by all heads
carries the position (eq. 3). The KV cache therefore holds only the normed latent and the rotated RoPE key:
kv_lora_rank + qk_rope_head_dim values per token per layer (576 at V3 sizes). This training-path implementation
re-expands the cached latent with W^UK / W^UV (kv_b_proj) at every step; absorbing them into the query and the
output (decoding without expansion) is a later optimisation.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from dsv3.model.rope import apply_rotary_emb, attention_softmax_scale


class MultiHeadLatentAttention(nn.Module):
    """MLA with optional query compression (q_lora_rank None = a plain W^Q) and decoupled RoPE."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.rope_interleave = config.rope_interleave
        dim, eps = config.hidden_size, config.rms_norm_eps
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(
                dim, self.n_heads * self.qk_head_dim, bias=False
            )  # [W^UQ; W^QR] without c_Q
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=False)  # W^DQ
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(
                self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False
            )  # [W^UQ; W^QR]
        self.kv_a_proj_with_mqa = nn.Linear(
            dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False
        )  # [W^DKV; W^KR]
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=eps)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, dim, bias=False)  # W^O
        self.softmax_scale = attention_softmax_scale(self.qk_head_dim, config.rope_parameters)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Eqs. 6-7: c_Q = W^DQ h (normed), q = W^UQ c_Q; (B, T, C) -> (B, H, T, nope + rope), RoPE not yet applied."""
        B, T, _ = x.shape
        q = (
            self.q_proj(x)
            if self.q_lora_rank is None
            else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        )
        return q.view(B, T, self.n_heads, self.qk_head_dim).transpose(1, 2)

    def latent_and_rope_key(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 1 and 3: the normed KV latent c_KV (B, 1, T, d_c) and the rotated shared key k^R (B, 1, T, d_R)."""
        B, T, _ = x.shape
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.kv_lora_rank)
        k_rope = apply_rotary_emb(k_rope.view(B, 1, T, self.qk_rope_head_dim), cos, sin, self.rope_interleave)
        return latent, k_rope

    def keys_and_values(
        self, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. 2, 4, 5: k = [W^UK c_KV; k^R], v = W^UV c_KV; (B, 1, S, ·) -> (B, H, S, nope + rope), (B, H, S, v)."""
        B, _, S, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(
            B, S, self.n_heads, self.qk_nope_head_dim + self.v_head_dim
        )
        k_nope, v = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, self.n_heads, S, self.qk_rope_head_dim)), dim=-1)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); cos/sin (B, T, d_R/2); mask (B, 1, T, S) bool, True = may attend, None = causal."""
        B, T, _ = x.shape
        q = self.queries(x)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat((q_nope, apply_rotary_emb(q_rope, cos, sin, self.rope_interleave)), dim=-1)  # eqs. 8-9
        latent, k_rope = self.latent_and_rope_key(x, cos, sin)
        if (
            past_key_values is not None
        ):  # the cache holds (c_KV, k^R) only: keys slot = latent, values slot = k^R
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)
        k, v = self.keys_and_values(latent, k_rope)
        o = F.scaled_dot_product_attention(  # eq. 10
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))  # eq. 11
