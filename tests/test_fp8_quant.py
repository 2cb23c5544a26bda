"""Tests for dsv3/fp8/quant.py: blockwise E4M3 quantisation (DeepSeek-V3 section 3.3.2).

Round-trip bound used below. With s the block's scale, y = x / s lies in [-448, 448]. E4M3 has 3 mantissa bits:
for a normal |y| in [2^e, 2^(e+1)) the step is 2^(e-3), so round-to-nearest errs by at most 2^(e-4) <= 2^-4 |y|
(half a step; the step itself, 2^-3 relative, is the "E4M3 relative step"). Below the smallest normal, 2^-6, the
step is the subnormal 2^-9, so the error is at most 2^-10. Scaling back by s (and the fp32 rounding of x / s and
q * s, each <= 2^-24 relative) gives, per element,
    |dequant(quant(x)) - x| <= 2^-4 |x| (1 + 2^-20) + 2^-10 s,
hence also <= 2^-4 amax_block + 2^-10 s: at most 1/16 of the block maximum.
"""

import math

import pytest
import torch

from dsv3.fp8.quant import AMAX_FLOOR, E4M3_MAX, dequantize_blockwise, quantize_blockwise

BLOCKS = [(1, 128), (128, 128), (128, 1)]
SHAPES = [(256, 384), (300, 260), (1, 5), (129, 1)]


def reference_quantize(x: torch.Tensor, block, power_of_two: bool):
    """Per-block loop: scale = max(amax, tiny)/448 (rounded up to 2^k if asked), q = e4m3(x / scale)."""
    br, bc = block
    rows, cols = x.shape
    n_r, n_c = math.ceil(rows / br), math.ceil(cols / bc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(n_r, n_c)
    for i in range(n_r):
        for j in range(n_c):
            blk = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            s = torch.clamp(blk.abs().max(), min=AMAX_FLOOR) / 448.0
            if power_of_two:
                s = torch.tensor(2.0 ** math.ceil(math.log2(s.item())), dtype=torch.float32)
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def heavy_tailed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(3 * torch.randn(*shape, generator=g))


def block_amax(x, block):
    br, bc = block
    rows, cols = x.shape
    x = torch.nn.functional.pad(x, (0, -cols % bc, 0, -rows % br))
    return x.abs().unflatten(1, (-1, bc)).unflatten(0, (-1, br)).amax(dim=(1, 3))


def expand_scale(scale, block, shape):
    br, bc = block
    return scale.repeat_interleave(br, -2).repeat_interleave(bc, -1)[..., :shape[-2], :shape[-1]]


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_per_block_loop_bitwise(shape, block, power_of_two):
    x = heavy_tailed(*shape)
    q, scale = quantize_blockwise(x, block, power_of_two=power_of_two)
    q_ref, scale_ref = reference_quantize(x, block, power_of_two)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert q.shape == x.shape and q.is_contiguous()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)


def test_bfloat16_input_matches_loop():
    x = heavy_tailed(130, 257).bfloat16()
    q, scale = quantize_blockwise(x, (1, 128))
    q_ref, scale_ref = reference_quantize(x, (1, 128), False)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_round_trip_within_half_e4m3_step(block, power_of_two):
    x = heavy_tailed(300, 260, seed=1)
    q, scale = quantize_blockwise(x, block, power_of_two=power_of_two)
    x_hat = dequantize_blockwise(q, scale, block)
    s = expand_scale(scale, block, x.shape)
    err = (x_hat - x).abs()
    assert torch.all(err <= 2**-4 * x.abs() * (1 + 2**-20) + 2**-10 * s)
    # the scale uses E4M3's range: each block's max lands on 448, or in [224, 448] with power-of-two scales
    block_max = block_amax(q.float(), block)
    assert torch.all(block_max <= E4M3_MAX) and torch.all(block_max >= (E4M3_MAX / 2 if power_of_two else E4M3_MAX))


def test_power_of_two_scales_are_powers_of_two_and_not_below_amax_over_448():
    x = heavy_tailed(256, 256, seed=2)
    _, plain = quantize_blockwise(x, (128, 128))
    _, p2 = quantize_blockwise(x, (128, 128), power_of_two=True)
    mantissa, _ = torch.frexp(p2)
    assert torch.all(mantissa == 0.5)
    assert torch.all(p2 >= plain) and torch.all(p2 < 2 * plain)


def test_zero_blocks_give_zeros_and_finite_scales():
    x = torch.zeros(256, 256)
    x[:128, :128] = torch.randn(128, 128)
    for block in BLOCKS:
        q, scale = quantize_blockwise(x, block)
        assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
        x_hat = dequantize_blockwise(q, scale, block)
        assert torch.all(x_hat[128:, :] == 0) and torch.all(x_hat[:, 128:] == 0)
        assert not torch.isnan(x_hat).any()


def test_partial_block_is_kept_with_its_own_scale():
    x = torch.full((1, 130), 0.01)
    x[0, 129] = 300.0  # the only large value sits in the padded last block
    q, scale = quantize_blockwise(x, (1, 128))
    assert scale.shape == (1, 2)
    assert scale[0, 1] == pytest.approx(300.0 / 448)
    assert dequantize_blockwise(q, scale, (1, 128))[0, 129] == 300.0


def test_leading_dims_index_independent_matrices():
    x = heavy_tailed(2, 130, 200, seed=3)
    q, scale = quantize_blockwise(x, (1, 128))
    q_flat, scale_flat = quantize_blockwise(x.reshape(-1, 200), (1, 128))
    assert scale.shape == (2, 130, 2)
    assert torch.equal(q.reshape(-1, 200).view(torch.uint8), q_flat.view(torch.uint8))
    assert torch.equal(scale.reshape(-1, 2), scale_flat)
    qw, sw = quantize_blockwise(x, (128, 128))  # a stack of two weights, each blocked on its own
    for e in range(2):
        q_e, s_e = quantize_blockwise(x[e], (128, 128))
        assert torch.equal(qw[e].view(torch.uint8), q_e.view(torch.uint8)) and torch.equal(sw[e], s_e)


def test_weight_blocks_are_transpose_invariant():
    """The activation gradient reuses the forward's 128x128 blocks of W for Wᵀ."""
    w = heavy_tailed(384, 260, seed=4)
    q, scale = quantize_blockwise(w, (128, 128))
    q_t, scale_t = quantize_blockwise(w.t(), (128, 128))
    assert torch.equal(q.t().view(torch.uint8), q_t.view(torch.uint8)) and torch.equal(scale.t(), scale_t)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: quantize_blockwise(torch.randn(256, 256), (64, 64)), "block must be one of"),
        (lambda: quantize_blockwise(torch.randn(256, 256), 128), "block must be one of"),
        (lambda: quantize_blockwise(torch.randn(256), (1, 128)), "at least 2 dims"),
        (lambda: quantize_blockwise(torch.ones(4, 4, dtype=torch.int64), (1, 128)), "float32/bfloat16/float16"),
        (lambda: quantize_blockwise([[1.0]], (1, 128)), "must be a torch.Tensor"),
        (lambda: dequantize_blockwise(torch.randn(4, 4), torch.ones(4, 1), (1, 128)), "float8_e4m3fn"),
        (lambda: dequantize_blockwise(torch.zeros(4, 256).to(torch.float8_e4m3fn), torch.ones(4, 1), (1, 128)),
         "scale has shape"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
