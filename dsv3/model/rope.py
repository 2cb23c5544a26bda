"""Rotary position embedding on the decoupled RoPE dims of MLA, with YaRN context extension.

Pretraining uses plain RoPE (``rope_parameters["rope_type"] == "default"``); context extension switches to YaRN
(arXiv 2309.00071; DeepSeek-V3 report §4.3) by changing only the config: ``rope_type="yarn"``, ``factor`` (s),
``original_max_position_embeddings``, ``beta_fast`` / ``beta_slow`` (the wavelength-ratio ramp) and
``mscale`` / ``mscale_all_dim`` (the attention temperature). The numbers follow transformers'
``_compute_yarn_parameters`` and DeepSeek's reference ``precompute_freqs_cis`` exactly.
"""

import math

import torch
from torch import nn


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(1/t) = 0.1·mscale·ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_len: int) -> float:
    """The rotary dim whose wavelength fits `num_rotations` times into the original context length."""
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inverse_frequencies(rope_parameters: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) of the rotary pairs and the factor that scales cos/sin.

    Plain RoPE: θ_j = base^(-2j/dim). YaRN: frequencies with fewer than beta_slow rotations over the original
    length are divided by `factor`, those with more than beta_fast are kept, a linear ramp in between; cos/sin are
    scaled by mscale(s, mscale) / mscale(s, mscale_all_dim) (1 for DeepSeek-V3, whose two are equal).
    """
    rope_type = rope_parameters.get("rope_type", "default")
    base = rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type != "yarn":
        raise ValueError(f"rope_type {rope_type!r} is not supported; use 'default' or 'yarn'")
    factor = rope_parameters["factor"]
    original_len = rope_parameters["original_max_position_embeddings"]
    beta_fast = rope_parameters.get("beta_fast") or 32
    beta_slow = rope_parameters.get("beta_slow") or 1
    mscale, mscale_all_dim = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")
    if rope_parameters.get("attention_factor") is not None:
        attention_factor = rope_parameters["attention_factor"]
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    low = yarn_correction_dim(beta_fast, dim, base, original_len)
    high = yarn_correction_dim(beta_slow, dim, base, original_len)
    if rope_parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low), 0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, float(attention_factor)


def yarn_config(
    config,
    *,
    original_length: int,
    max_length: int,
    factor: float,
    beta_fast: float,
    beta_slow: float,
    mscale: float,
    mscale_all_dim: float,
):
    """A copy of the plain-RoPE model config `config` with YaRN RoPE over `original_length` tokens, declared for
    `max_length` positions.

    The fields are transformers' yarn ``rope_parameters``: the scale factor s = `factor`; `beta_fast` / `beta_slow`
    bound the "NTK-by-parts" ramp over the wavelength ratio r = L/λ (YaRN, arXiv 2309.00071, §3.2: α = beta_slow,
    β = beta_fast); `mscale` / `mscale_all_dim` set the attention temperature √(1/t) = 0.1·mscale·ln s + 1 (§3.4).
    DeepSeek-V3 report §4.3: s = 40, α = 1, β = 32 (docs/paper.md, "Context extension (YaRN)").
    """
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise ValueError(
            f"the pretrained model already uses rope_type {config.rope_parameters['rope_type']!r}: extend a plain-RoPE model"
        )
    fields = config.to_dict()
    fields["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": config.rope_parameters["rope_theta"],
        "factor": factor,
        "original_max_position_embeddings": original_length,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "mscale": mscale,
        "mscale_all_dim": mscale_all_dim,
    }
    fields["max_position_embeddings"] = max_length
    return type(config).from_dict(fields)


def attention_softmax_scale(qk_head_dim: int, rope_parameters: dict) -> float:
    """1/sqrt(d_h + d_h^R) (eq. 10), times mscale(s, mscale_all_dim)² when YaRN is on (reference code)."""
    scale = qk_head_dim**-0.5
    if rope_parameters.get("rope_type", "default") == "yarn" and rope_parameters.get("mscale_all_dim"):
        scale *= yarn_mscale(rope_parameters["factor"], rope_parameters["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the rotary pairs for given positions (eqs. 3 and 8: RoPE(·))."""

    def __init__(self, rope_parameters: dict, dim: int):
        super().__init__()
        inv_freq, self.attention_factor = rope_inverse_frequencies(rope_parameters, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (B, T) -> cos, sin (B, T, dim/2), fp32
        angles = position_ids[..., None].float() * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rotary_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True
) -> torch.Tensor:
    """Rotate the pairs of the last dim of x (…, T, R) by the angles of (B, T, R/2) cos/sin.

    With ``interleave`` the pairs are adjacent dims (x0, x1), (x2, x3), … as in DeepSeek's reference code (the
    released weights are laid out for it); otherwise the halves (x_j, x_{j+R/2}). The output holds the rotated
    pairs as [first members; second members]: one fixed permutation of the dims, the same for queries and keys,
    so every q·k product equals the reference's.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # (B, 1, T, R/2) over the heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
