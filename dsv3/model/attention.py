"""Multi-head Latent Attention (MLA), DeepSeek-V3 report §2.1.1, eqs. 1-11.

Keys and values are compressed into one latent c_KV per token (eq. 1); a single RoPE key shared by all heads
carries the position (eq. 3). The KV cache therefore holds only the normed latent and the rotated RoPE key:
kv_lora_rank + qk_rope_head_dim values per token per layer (576 at V3 sizes).

Training and prefill (an empty cache) expand the latent into per-head keys and values with W^UK / W^UV
(kv_b_proj). Decoding (a cache that already holds tokens) absorbs them instead, as DeepSeek serves the model:

    q_h^C · (W^UK_h c_j) = (W^UK_h^T q_h^C) · c_j        scores against the latent directly,
    Σ_j p_hj W^UV_h c_j   = W^UV_h (Σ_j p_hj c_j)         one up-projection per query, not per cached token,

so a decode step reads kv_lora_rank + qk_rope_head_dim values per cached token, shared by every head, and
never builds the per-head keys and values (40,960 values per token at V3 sizes).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from dsv3.model.rope import apply_rotary_emb, attention_softmax_scale


class MultiHeadLatentAttention(nn.Module):
    """MLA with optional query compression (q_lora_rank None = a plain W^Q) and decoupled RoPE.

    `absorb` (default True) selects absorbed decoding whenever the cache already holds tokens; False keeps the
    expanded path everywhere (`dsv3.infer.absorb_attention` switches it for a whole model)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.absorb = True
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
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); cos/sin (B, T, d_R/2); mask (B, 1, T, S) bool, True = may attend, None = causal."""
        if self.absorb and cache is not None and cache.get_seq_length(self.layer_idx) > 0:
            return self.absorbed_forward(x, cos, sin, mask, cache)
        B, T, _ = x.shape
        q = self.queries(x)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q = torch.cat((q_nope, apply_rotary_emb(q_rope, cos, sin, self.rope_interleave)), dim=-1)  # eqs. 8-9
        latent, k_rope = self.latent_and_rope_key(x, cos, sin)
        if (
            cache is not None
        ):  # the cache holds (c_KV, k^R) only: keys slot = latent, values slot = k^R
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)
        k, v = self.keys_and_values(latent, k_rope)
        o = F.scaled_dot_product_attention(  # eq. 10
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.v_head_dim))  # eq. 11

    def absorbed_forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache,
    ) -> torch.Tensor:
        """Eqs. 10-11 over the compressed cache with W^UK folded into the query and W^UV applied after the sum."""
        B, T, _ = x.shape
        H, dn, dv = self.n_heads, self.qk_nope_head_dim, self.v_head_dim
        q_nope, q_rope = self.queries(x).split([dn, self.qk_rope_head_dim], dim=-1)  # (B, H, T, ·)
        q_rope = apply_rotary_emb(q_rope, cos, sin, self.rope_interleave)  # eq. 8
        latent, k_rope = self.latent_and_rope_key(x, cos, sin)
        latent, k_rope = cache.update(latent, k_rope, self.layer_idx)  # (B, 1, S, d_c), (B, 1, S, d_R)
        w_uk, w_uv = self.kv_b_proj.weight.view(H, dn + dv, self.kv_lora_rank).split([dn, dv], dim=1)
        q_latent = absorb_key_projection(q_nope, w_uk)  # (B, H, T, d_c)
        probs = latent_attention_weights(q_latent, q_rope, latent, k_rope, mask, self.softmax_scale)
        o_latent = probs @ latent  # (B, H, T, S) @ (B, 1, S, d_c) -> (B, H, T, d_c): Σ_j p_hj c_j
        o = absorb_value_projection(o_latent, w_uv)  # (B, T, H, d_v)
        return self.o_proj(o.reshape(B, T, H * dv))  # eq. 11


def absorb_key_projection(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """W^UK_h^T q_h^C: each head's non-RoPE query moved into latent space; (B, H, T, d_h), (H, d_h, d_c) -> (B, H, T, d_c)."""
    return torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)


def absorb_value_projection(o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """W^UV_h applied once to the weighted sum of latents; (B, H, T, d_c), (H, d_v, d_c) -> (B, T, H, d_v)."""
    return torch.einsum("bhtc,hvc->bthv", o_latent, w_uv)


def latent_attention_weights(q_latent, q_rope, latent, k_rope, mask, scale) -> torch.Tensor:
    """Eq. 10 over the compressed cache: softmax(scale · (q^C W^UK c + q^R k^R)) with the causal / padding mask.

    q_latent (B, H, T, d_c), q_rope (B, H, T, d_R); latent (B, 1, S, d_c), k_rope (B, 1, S, d_R) are shared by all
    heads, so the H·T queries of a batch row are one matrix product against the S cached tokens.
    mask (B, 1, T, S) bool (True = may attend) or None = causal, the T queries being the last T of the S tokens.
    """
    B, H, T, _ = q_latent.shape
    S = latent.shape[2]
    scores = (q_latent.reshape(B, H * T, -1) @ latent[:, 0].transpose(1, 2)).view(B, H, T, S)
    scores = scores + (q_rope.reshape(B, H * T, -1) @ k_rope[:, 0].transpose(1, 2)).view(B, H, T, S)
    if mask is None and T > 1:
        positions = torch.arange(S, device=scores.device)
        mask = (positions[None, :] <= positions[S - T :, None])[None, None]  # (1, 1, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores * scale).softmax(dim=-1, dtype=torch.float32).to(latent.dtype)
