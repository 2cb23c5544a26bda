"""Tests for dsv3/fp8/linear.py: the FP8 linear (DeepSeek-V3 section 3.3) and its grouped (MoE) form.

Error bound asserted against fp32. Each quantised operand Â = A + ΔA has elementwise |ΔA| <= 2^-4 |A| (half an
E4M3 step, see tests/test_fp8_quant.py), so its relative Frobenius error e_A = ||ΔA|| / ||A|| is <= 2^-4. For a
GEMM C = A Bᵀ, Ĉ - C = ΔA Bᵀ + A ΔBᵀ + ΔA ΔBᵀ; when the rounding errors are uncorrelated with the other operand
(true for random data) ||ΔA Bᵀ|| / ||A Bᵀ|| ≈ e_A, so ||Ĉ - C|| / ||C|| ≲ e_A + e_B + e_A e_B <= 2^-3 + 2^-8.
We assert the operand-specific form, rel(Ĉ) <= e_A + e_B + e_A e_B, with e_A, e_B measured on the very operands
each GEMM quantises (about 2.6% each for Gaussian data, so the bound is about 5.3% while the measured product
error is about sqrt(e_A^2 + e_B^2) ≈ 3.7%), and the absolute cap 2^-3.
"""

import pytest
import torch
from torch import nn

from dsv3.fp8 import FP8Linear, FP8LinearFunction, dequantize_blockwise, fp8_grouped_mm, quantize_blockwise
from dsv3.fp8.linear import ACT_BLOCK, TOKEN_BLOCK, WEIGHT_BLOCK, fp8_mm, resolve_backend


def rel(a, ref):
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def fake_quant(t, block):
    return dequantize_blockwise(*quantize_blockwise(t, block), block)


def product_bound(a, a_block, b, b_block):
    e_a, e_b = rel(fake_quant(a, a_block), a), rel(fake_quant(b, b_block), b)
    return min(e_a + e_b + e_a * e_b, 2**-3)


def run_linear(x, w, b, dy, fp8: bool):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = FP8LinearFunction.apply(x, w, b, "emulated") if fp8 else nn.functional.linear(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    tokens, d_in, d_out = 300, 384, 320  # 300 and 320 are not multiples of 128: padding in every GEMM
    x = torch.randn(tokens, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g)
    dy = torch.randn(tokens, d_out, generator=g)
    return x, w, b, dy


def test_forward_and_gradients_close_to_fp32(problem):
    x, w, b, dy = problem
    y, dx, dw, db = run_linear(x, w, None, dy, fp8=True)
    y_ref, dx_ref, dw_ref, _ = run_linear(x, w, None, dy, fp8=False)
    assert rel(y, y_ref) <= product_bound(x, ACT_BLOCK, w, WEIGHT_BLOCK)
    assert rel(dx, dx_ref) <= product_bound(dy, ACT_BLOCK, w, WEIGHT_BLOCK)
    assert rel(dw, dw_ref) <= product_bound(dy, TOKEN_BLOCK, x, TOKEN_BLOCK)
    assert 0.01 < rel(dx, dx_ref)  # the gradient really went through FP8


def test_emulated_backend_uses_exactly_quantize_blockwise(problem):
    """Bit for bit: each GEMM multiplies the dequantised (q, scale) pairs quantize_blockwise returns."""
    x, w, b, dy = problem
    y, dx, dw, db = run_linear(x, w, b, dy, fp8=True)
    assert torch.equal(y, fake_quant(x, ACT_BLOCK) @ fake_quant(w, WEIGHT_BLOCK).t() + b)
    assert torch.equal(dx, fake_quant(dy, ACT_BLOCK) @ fake_quant(w, WEIGHT_BLOCK))
    assert torch.equal(dw, fake_quant(dy, TOKEN_BLOCK).t() @ fake_quant(x, TOKEN_BLOCK))
    assert torch.equal(db, dy.sum(0))  # the bias stays out of the GEMMs


def test_dtypes_follow_input_and_master_weight(problem):
    x, w, b, dy = problem
    y, dx, dw, db = run_linear(x.bfloat16(), w, b, dy.bfloat16(), fp8=True)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32


def test_autocast_does_not_reach_the_fp32_accumulation(problem):
    x, w, b, dy = problem
    layer = FP8Linear(w.shape[1], w.shape[0], backend="emulated")
    layer.load_state_dict({"weight": w, "bias": b})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert torch.equal(y, layer(x))


def test_fp8_linear_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    linear = nn.Linear(256, 192)
    fp8 = FP8Linear.from_linear(linear, backend="emulated")
    assert fp8.weight is linear.weight and fp8.bias is linear.bias and fp8.weight.dtype == torch.float32
    assert isinstance(fp8, nn.Linear) and fp8.state_dict().keys() == linear.state_dict().keys()
    fresh = FP8Linear(256, 192, backend="emulated")
    fresh.load_state_dict(linear.state_dict())
    x = torch.randn(2, 5, 256)  # leading dims (B, T) pass through
    assert fresh(x).shape == (2, 5, 192) and torch.equal(fresh(x), fp8(x))
    assert rel(fp8(x), linear(x)) < 2**-3
    no_bias = FP8Linear.from_linear(nn.Linear(128, 128, bias=False))
    assert no_bias.bias is None and "backend=auto" in repr(no_bias)


def test_backend_switch():
    assert resolve_backend("auto", "cpu") == "emulated"
    assert resolve_backend("scaled_mm", "meta") == "scaled_mm"
    with pytest.raises(ValueError, match="use backend='emulated'"):
        resolve_backend("scaled_mm", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        FP8Linear(128, 128, backend="fp8")


@pytest.mark.parametrize("tokens, d_in, d_out", [(512, 768, 256), (200, 300, 260)])
def test_scaled_mm_path_meets_torch_layout_contract_on_meta(tokens, d_in, d_out):
    """On meta tensors torch runs scaled_mm's CUDA shape/stride checks (_check_scaled_mm_sizes_v2) for all
    three GEMMs; numerics of this path need an sm_90 GPU and are not tested here."""
    layer = FP8Linear(d_in, d_out, device="meta", backend="scaled_mm")
    x = torch.empty(tokens, d_in, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.backward(torch.empty_like(y))
    assert y.shape == (tokens, d_out) and y.dtype == torch.bfloat16
    assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape
    # the check is live: a scale in the wrong major-ness is rejected
    a = quantize_blockwise(torch.empty(256, 256, device="meta"), ACT_BLOCK)
    bad_scale = torch.empty(256, 2, device="meta")  # row-major; BlockWise1x128 wants (1, M) strides
    with pytest.raises(RuntimeError, match="1x128"):
        torch.nn.functional.scaled_mm(a[0], a[0].t(), bad_scale, torch.nn.functional.ScalingType.BlockWise1x128,
                                      bad_scale, torch.nn.functional.ScalingType.BlockWise1x128)
    assert fp8_mm(a, a, ACT_BLOCK, torch.float32, "scaled_mm").shape == (256, 256)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: FP8Linear(128, 64)(torch.randn(4, 100)), "last dim must be 128"),
        (lambda: FP8LinearFunction.apply(torch.ones(4, 128, dtype=torch.int32), torch.randn(64, 128), None,
                                         "emulated"), "float tensor"),
        (lambda: FP8LinearFunction.apply(torch.randn(4, 128), torch.randn(64, 128), torch.randn(3), "emulated"),
         "bias must have shape"),
    ],
)
def test_linear_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def grouped_problem():
    g = torch.Generator().manual_seed(1)
    counts = [100, 0, 150, 40]  # an empty expert; 10 trailing rows past offs[-1]
    x = torch.randn(sum(counts) + 10, 256, generator=g)
    w = torch.randn(len(counts), 256, 192, generator=g) / 16  # (E, K, N), torch._grouped_mm's layout
    dy = torch.randn(x.shape[0], 192, generator=g)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, dy, offs, counts


def test_grouped_mm_equals_per_expert_fp8_linear():
    x, w, dy, offs, counts = grouped_problem()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_grouped_mm(xg, wg, offs, backend="emulated")
    y.backward(dy)
    start = 0
    for e, count in enumerate(counts):
        x_e = x[start:start + count].clone().requires_grad_()
        w_e = w[e].t().clone().requires_grad_()  # as an nn.Linear weight (N, K)
        y_e = FP8LinearFunction.apply(x_e, w_e, None, "emulated")
        y_e.backward(dy[start:start + count])
        assert torch.equal(y[start:start + count], y_e)
        assert torch.equal(xg.grad[start:start + count], x_e.grad)
        assert torch.equal(wg.grad[e], w_e.grad.t()) if count else torch.all(wg.grad[e] == 0)
        start += count
    assert torch.all(y[start:] == 0) and torch.all(xg.grad[start:] == 0)


def test_grouped_mm_matches_torch_grouped_mm_semantics():
    x, w, dy, offs, counts = grouped_problem()
    n = int(offs[-1])
    y_ref = torch._grouped_mm(x, w, offs=offs)[:n]  # rows past offs[-1] are undefined there
    y = fp8_grouped_mm(x, w, offs, backend="emulated")[:n]
    assert rel(y, y_ref) <= product_bound(x, ACT_BLOCK, w.flatten(0, 1), WEIGHT_BLOCK)


def test_grouped_scaled_mm_path_on_meta():
    x = torch.empty(300, 256, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(3, 256, 384, device="meta", requires_grad=True)
    y = fp8_grouped_mm(x, w, torch.tensor([100, 100, 300]), backend="scaled_mm")
    y.backward(torch.empty_like(y))
    assert y.shape == (300, 384) and x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize(
    "offs, match",
    [
        (torch.tensor([1.0, 2.0, 3.0]), "integer tensor"),
        (torch.tensor([1, 2]), "has 2 entries"),
        (torch.tensor([5, 2, 9]), "non-decreasing"),
        (torch.tensor([5, 9, 999]), "non-decreasing"),
    ],
)
def test_grouped_bad_offsets_raise_value_error(offs, match):
    with pytest.raises(ValueError, match=match):
        fp8_grouped_mm(torch.randn(20, 128), torch.randn(3, 128, 128), offs, backend="emulated")
