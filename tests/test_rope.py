"""dsv3/model/rope.py: RoPE and YaRN frequencies, the YaRN config, interleaved rotation, softmax scale."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dsv3.model.rope import (
    RotaryEmbedding,
    apply_rotary_emb,
    attention_softmax_scale,
    rope_inverse_frequencies,
    yarn_config,
)
from tests.toy_model import toy_config

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def test_plain_rope_frequencies():
    inv_freq, factor = rope_inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, 64)
    assert factor == 1.0
    torch.testing.assert_close(inv_freq, 10000.0 ** (-torch.arange(0, 64, 2).float() / 64))


def test_yarn_frequencies_match_transformers():
    for params in (YARN, {**YARN, "mscale": 0.707, "factor": 8.0}):
        config = DeepseekV3Config(
            rope_parameters=dict(params), max_position_embeddings=163840, qk_rope_head_dim=64
        )
        expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
        inv_freq, factor = rope_inverse_frequencies(params, 64)
        torch.testing.assert_close(inv_freq, expected)
        assert math.isclose(factor, expected_factor)


def test_yarn_ramp_keeps_high_and_divides_low_frequencies():
    plain, _ = rope_inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, 64)
    yarn, _ = rope_inverse_frequencies(YARN, 64)
    torch.testing.assert_close(yarn[0], plain[0])  # many rotations over 4K: extrapolated, unchanged
    torch.testing.assert_close(yarn[-1], plain[-1] / 40)  # under one rotation: interpolated by s
    assert torch.all(yarn <= plain) and torch.all(yarn >= plain / 40 - 1e-12)


def test_yarn_config_switches_only_the_rope_and_refuses_a_yarn_model():
    plain = toy_config(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    settings = {k: YARN[k] for k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")}
    config = yarn_config(plain, original_length=4096, max_length=163840, **settings)
    assert config.rope_parameters == {**YARN, "rope_theta": 5000.0}
    assert config.max_position_embeddings == 163840
    changed = {k for k, v in config.to_dict().items() if plain.to_dict()[k] != v}
    assert changed == {"rope_parameters", "max_position_embeddings"}
    with pytest.raises(ValueError, match="already uses rope_type 'yarn'"):
        yarn_config(config, original_length=4096, max_length=163840, **settings)


def test_softmax_scale_uses_mscale_squared_only_with_yarn():
    assert attention_softmax_scale(192, {"rope_type": "default", "rope_theta": 1e4}) == 192**-0.5
    mscale = 0.1 * math.log(40) + 1
    assert math.isclose(attention_softmax_scale(192, YARN), 192**-0.5 * mscale**2)


def test_interleaved_rotation_is_the_reference_complex_product():
    x = torch.randn(2, 3, 5, 8)  # (B, H, T, R)
    cos, sin = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, 8)(
        torch.arange(5)[None].expand(2, 5)
    )
    ours = apply_rotary_emb(x, cos, sin, interleave=True)
    reference = torch.view_as_real(
        torch.view_as_complex(x.view(2, 3, 5, 4, 2))
        * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]
    )
    torch.testing.assert_close(torch.cat((reference[..., 0], reference[..., 1]), dim=-1), ours)


def test_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(YARN, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        cq, sq = rope(torch.tensor([[i]]))
        ck, sk = rope(torch.tensor([[j]]))
        return (apply_rotary_emb(q, cq, sq) * apply_rotary_emb(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(107, 103), atol=1e-4, rtol=1e-4)
    assert not torch.isclose(score(7, 3), score(7, 5))
