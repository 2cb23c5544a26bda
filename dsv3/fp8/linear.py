"""FP8 linear layers with fine-grained scaling, DeepSeek-V3 section 3.3 (Figure 6, "Mixed precision framework").

All three GEMMs of a linear layer take E4M3 operands and accumulate in FP32; every GEMM is written as
``Y = A Bᵀ`` with A (M, K) and B (N, K) both quantised along their shared inner dimension K:

- forward   ``y  = x Wᵀ``:  A = x  (T, in)  in 1x128 tiles,  B = W  (out, in) in 128x128 blocks;
- dgrad     ``dx = dy W``:  A = dy (T, out) in 1x128 tiles,  B = Wᵀ (in, out) in the same 128x128 blocks
  (1x128 stays for activation gradients: the paper saw 128x128 blocks there diverge);
- wgrad     ``dW = dyᵀ x``: A = dyᵀ, B = xᵀ, i.e. dy and x in 128x1 tiles along the token dimension.

Scaling: ``blockwise`` is the paper's (the tiles above); ``tensorwise`` is the coarse baseline it is measured
against — every GEMM operand (the layer's input, its weight, the output gradient; per routed expert, that expert's
tokens and weight) carries a single FP32 scale, so one outlier sets the resolution of the whole tensor.

Backends: ``emulated`` dequantises the very (q, scale) pairs ``quantize_blockwise`` gives and multiplies in fp32
(runs anywhere; used by the tests); ``scaled_mm`` hands the same pairs to ``torch.nn.functional.scaled_mm`` with
the BlockWise1x128 / BlockWise128x128 recipes (cuBLAS, sm_90 with CUDA >= 12.9) or, for tensorwise scaling, the
TensorWise recipe (sm_89 and later GPUs; torch also runs it on CPUs); ``auto`` picks ``scaled_mm`` where it runs on
a GPU and ``emulated`` elsewhere.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import ScalingType

from dsv3.fp8.quant import FP8_DTYPE, TENSOR, dequantize_blockwise, quantize_blockwise

BACKENDS = ("emulated", "scaled_mm", "auto")
ACT_BLOCK = (1, 128)  # activations (and their gradients) along the GEMM's inner dimension
WEIGHT_BLOCK = (128, 128)  # weights
TOKEN_BLOCK = (128, 1)  # activations and gradients along tokens, the inner dimension of the weight gradient
# scaling -> (activation, weight, weight-gradient token) blocks
SCALINGS = {"blockwise": (ACT_BLOCK, WEIGHT_BLOCK, TOKEN_BLOCK), "tensorwise": (TENSOR, TENSOR, TENSOR)}


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_scaling(scaling: str) -> str:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {tuple(SCALINGS)}, got {scaling!r}")
    return scaling


def scaled_mm_supported(device) -> bool:
    """Whether torch's blockwise ("DeepSeek") scaled_mm recipes run on ``device``: sm_90 with CUDA >= 12.9."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9 and tuple(int(v) for v in torch.version.cuda.split(".")[:2]) >= (12, 9)


def tensorwise_scaled_mm_supported(device) -> bool:
    """Whether FP8 GEMMs with tensor-wise scales run on the GPU ``device``: sm_89 (Ada) and later."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_backend(backend: str, device, scaling: str = "blockwise") -> str:
    """``auto`` -> ``scaled_mm`` where it runs on a GPU, else ``emulated``; blockwise ``scaled_mm`` needs CUDA (or
    meta) tensors, tensorwise ``scaled_mm`` also runs on CPUs."""
    _check_backend(backend)
    _check_scaling(scaling)
    device = torch.device(device)
    if scaling == "tensorwise":
        if backend == "auto":
            return "scaled_mm" if tensorwise_scaled_mm_supported(device) else "emulated"
        return backend
    if backend == "auto":
        return "scaled_mm" if scaled_mm_supported(device) else "emulated"
    if backend == "scaled_mm" and device.type not in ("cuda", "meta"):
        raise ValueError(f"backend 'scaled_mm' needs CUDA tensors on an sm_90 GPU, got device {device}; "
                         "use backend='emulated' or 'auto'")
    return backend


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an E4M3 matrix to (rows, cols), row-major (padding as bytes: 0x00 is +0.0 in E4M3)."""
    q = q.contiguous()
    if tuple(q.shape) == (rows, cols):
        return q
    return F.pad(q.view(torch.uint8), (0, cols - q.shape[1], 0, rows - q.shape[0])).view(FP8_DTYPE)


def _pad_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pad a scale grid with ones (they only ever multiply zero padding)."""
    return F.pad(scale, (0, cols - scale.shape[1], 0, rows - scale.shape[0]), value=1.0)


def _scaled_mm_blockwise(a, b, b_block, out_dtype: torch.dtype) -> torch.Tensor:
    """``fp8_mm`` on cuBLAS via ``torch.nn.functional.scaled_mm``, in the layouts its blockwise recipes demand.

    Operands are zero-padded to multiples of 128 and the result cropped. Scale layouts (torch 2.13,
    ``_check_scaled_mm_sizes_v2``): a 1x128 scale of an (M, K) operand is (M, K/128) with strides (1, M),
    i.e. M-major; a 128x128 scale of B is (L4, N/128) with strides (1, L4), L4 = K/128 rounded up to 4.
    """
    (a_q, a_scale), (b_q, b_scale) = a, b
    m, n = a_q.shape[0], b_q.shape[0]
    m_pad, n_pad, k_pad = _round_up(m, 128), _round_up(n, 128), _round_up(a_q.shape[1], 128)
    k_blocks = k_pad // 128
    a_q = _pad_fp8(a_q, m_pad, k_pad)  # (Mp, Kp) row-major
    b_q = _pad_fp8(b_q, n_pad, k_pad)  # (Np, Kp) row-major, so b_q.t() is the column-major (Kp, Np) mat2
    a_scale = _pad_scale(a_scale, m_pad, k_blocks).t().contiguous().t()  # (Mp, Kp/128), M-major
    if b_block == ACT_BLOCK:
        b_recipe = ScalingType.BlockWise1x128
        b_scale = _pad_scale(b_scale, n_pad, k_blocks).t().contiguous().t()  # (Np, Kp/128), N-major
    else:
        b_recipe = ScalingType.BlockWise128x128
        b_scale = _pad_scale(b_scale, n_pad // 128, _round_up(k_blocks, 4)).contiguous().t()  # (L4, Np/128)
    kernel_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
    y = F.scaled_mm(a_q, b_q.t(), a_scale, ScalingType.BlockWise1x128, b_scale, b_recipe,
                    output_dtype=kernel_dtype)
    return y[:m, :n].to(out_dtype)


def _scaled_mm_tensorwise(a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """``fp8_mm`` with one scale per operand through ``torch.nn.functional.scaled_mm``'s TensorWise recipe (A
    row-major, B as a column-major mat2; both zero-padded to multiples of 16, as cuBLAS asks, and cropped back)."""
    (a_q, a_scale), (b_q, b_scale) = a, b
    m, n = a_q.shape[0], b_q.shape[0]
    k_pad = _round_up(a_q.shape[1], 16)
    a_q = _pad_fp8(a_q, _round_up(m, 16), k_pad)
    b_q = _pad_fp8(b_q, _round_up(n, 16), k_pad)
    kernel_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
    y = F.scaled_mm(a_q, b_q.t(), a_scale.reshape(()).float(), ScalingType.TensorWise, b_scale.reshape(()).float(),
                    ScalingType.TensorWise, output_dtype=kernel_dtype)
    return y[:m, :n].to(out_dtype)


def fp8_mm(a, b, b_block, out_dtype: torch.dtype, backend: str, a_block=ACT_BLOCK) -> torch.Tensor:
    """``Y = A Bᵀ`` from FP8 operands with FP32 accumulation (section 3.3.2, "increasing accumulation precision").

    ``a = (q, scale)`` of A (M, K) in ``a_block`` (1x128 tiles, or TENSOR); ``b = (q, scale)`` of B (N, K) in
    ``b_block`` (1x128 or 128x128, or TENSOR), both along K. ``backend`` is ``emulated`` or ``scaled_mm`` (see
    ``resolve_backend``).
    """
    if backend == "scaled_mm":
        if TENSOR in (a_block, b_block):
            return _scaled_mm_tensorwise(a, b, out_dtype)
        return _scaled_mm_blockwise(a, b, b_block, out_dtype)
    device_type = a[0].device.type  # autocast would round the fp32 operands to bf16: keep it off here
    with torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext():
        return (dequantize_blockwise(*a, a_block) @ dequantize_blockwise(*b, b_block).t()).to(out_dtype)


def _check_linear_inputs(x: torch.Tensor, weight: torch.Tensor, bias) -> None:
    if not x.is_floating_point():
        raise ValueError(f"FP8 linear input must be a float tensor, got {x.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"FP8 linear: input of shape {tuple(x.shape)} does not match weight "
                         f"{tuple(weight.shape)} (out_features, in_features); its last dim must be {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"FP8 linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


class FP8LinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` with the forward, activation-gradient and weight-gradient GEMMs all in FP8 (Figure 6).

    x (..., in) in any float dtype, W (out, in) master weights (fp32). y and dx come back in x's dtype, dW in
    W's. The bias (DeepSeek-V3's linears have none) stays out of the GEMMs: added to y, its gradient summed in
    fp32. x is saved in its own precision for the weight gradient, which re-quantises it in 128x1 tiles.
    ``scaling``: ``blockwise`` (those tiles) or ``tensorwise`` (one scale per operand).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, backend, scaling="blockwise"):
        _check_linear_inputs(x, weight, bias)
        act, block, _ = SCALINGS[_check_scaling(scaling)]
        backend = resolve_backend(backend, x.device, scaling)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        w_q = quantize_blockwise(weight, block)  # (out, in), (out/128, in/128)
        y = fp8_mm(quantize_blockwise(x2, act), w_q, block, x.dtype, backend, act)  # (T, out)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x2, *w_q)
        ctx.backend, ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = backend, scaling, x.shape, x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w_q, w_scale = ctx.saved_tensors
        act, block, token = SCALINGS[ctx.scaling]
        dy2 = dy.reshape(-1, dy.shape[-1])  # (T, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # dx = dy W: dy in 1x128 tiles along out, W in its forward 128x128 blocks
            dy_q = quantize_blockwise(dy2, act)
            dx = fp8_mm(dy_q, (w_q.t(), w_scale.t()), block, ctx.x_dtype, ctx.backend, act).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # dW = dyᵀ x: dy and x in 128x1 tiles along tokens
            dw = _token_mm(dy2, x2, ctx.w_dtype, ctx.backend, token)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db, None, None


def _token_mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, backend: str, block=TOKEN_BLOCK) -> torch.Tensor:
    """``aᵀ b`` contracted over tokens, as in the weight gradient ``dW = dyᵀ x``: a (T, P) and b (T, Q) in 128x1
    tiles along T, which are 1x128 tiles of aᵀ and bᵀ along their inner dimension (or one scale each, for
    block=TENSOR). Returns (P, Q)."""
    a_q, a_scale = quantize_blockwise(a, block)
    b_q, b_scale = quantize_blockwise(b, block)
    inner = ACT_BLOCK if block == TOKEN_BLOCK else TENSOR
    return fp8_mm((a_q.t(), a_scale.t()), (b_q.t(), b_scale.t()), inner, out_dtype, backend, inner)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose three GEMMs run in FP8 with fine-grained scaling (section 3.3), or with per-tensor
    scaling for comparison.

    Same parameters and state dict as ``nn.Linear``; the weight stays a high-precision master copy and is
    quantised afresh on every call. ``backend``: ``auto`` | ``scaled_mm`` | ``emulated``; ``scaling``:
    ``blockwise`` | ``tensorwise``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "auto", scaling: str = "blockwise"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = _check_backend(backend)
        self.scaling = _check_scaling(scaling)

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", scaling: str = "blockwise") -> "FP8Linear":
        """An FP8Linear sharing ``linear``'s weight and bias Parameters (so optimizers and state dicts carry over)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        fp8 = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  backend=backend, scaling=scaling)
        fp8.weight, fp8.bias = linear.weight, linear.bias
        return fp8.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.bias, self.backend, self.scaling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}, scaling={self.scaling}"


def _group_spans(offs: torch.Tensor, n_groups: int, n_rows: int) -> list[tuple[int, int]]:
    """[(start, end)] row ranges per group from cumulative ends ``offs`` (torch._grouped_mm's convention)."""
    if not isinstance(offs, torch.Tensor) or offs.dim() != 1 or offs.is_floating_point() or offs.is_complex():
        raise ValueError("offs must be a 1-D integer tensor of cumulative group ends, e.g. counts.cumsum(0)")
    if offs.numel() != n_groups:
        raise ValueError(f"offs has {offs.numel()} entries but w_stacked has {n_groups} experts")
    ends = offs.tolist()
    if any(b < a for a, b in zip([0, *ends], ends, strict=False)) or (ends and ends[-1] > n_rows):
        raise ValueError(f"offs must be non-decreasing, start at >= 0 and end at <= {n_rows} rows, got {ends}")
    return list(zip([0, *ends[:-1]], ends, strict=True))


class FP8GroupedMMFunction(torch.autograd.Function):
    """Grouped ``y[rows of e] = x[rows of e] @ w[e]`` for MoE experts with every GEMM in FP8 (section 3.3).

    Same quantisation as ``FP8LinearFunction`` per expert: tokens in 1x128 tiles, each expert's weight in its
    own 128x128 blocks, and for the weight gradient 128x1 tiles that start at each expert's first token. Each
    expert's rows are quantised on their own (for 1x128 tiles the same as quantising all rows at once; for
    tensorwise scaling, one scale for the expert's tokens, as if each expert were its own linear layer).
    """

    @staticmethod
    def forward(ctx, x, w, offs, backend, scaling="blockwise"):
        if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
            raise ValueError(f"fp8_grouped_mm needs x_sorted (T, K) and w_stacked (E, K, N), got {tuple(x.shape)} "
                             f"and {tuple(w.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"fp8_grouped_mm input must be a float tensor, got {x.dtype}")
        spans = _group_spans(offs, w.shape[0], x.shape[0])
        act, block, _ = SCALINGS[_check_scaling(scaling)]
        backend = resolve_backend(backend, x.device, scaling)
        w_q, w_scale = quantize_blockwise(w, block)  # (E, K, N), (E, K/128, N/128)
        y = x.new_zeros(x.shape[0], w.shape[2])  # (T, N); rows past offs[-1] stay zero
        for e, (start, end) in enumerate(spans):
            if end > start:  # x_e (T_e, K) in 1x128 tiles along K
                y[start:end] = fp8_mm(quantize_blockwise(x[start:end], act), (w_q[e].t(), w_scale[e].t()),
                                      block, x.dtype, backend, act)
        ctx.save_for_backward(x, w_q, w_scale)
        ctx.spans, ctx.backend, ctx.scaling, ctx.w_dtype = spans, backend, scaling, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_q, w_scale = ctx.saved_tensors
        act, block, token = SCALINGS[ctx.scaling]
        dx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        dw = w_q.new_zeros(w_q.shape, dtype=ctx.w_dtype) if ctx.needs_input_grad[1] else None
        for e, (start, end) in enumerate(ctx.spans):
            if end == start:
                continue
            if dx is not None:  # dx_e = dy_e W_eᵀ: dy_e in 1x128 tiles along N, B = W_e (K, N), blocked along N
                dx[start:end] = fp8_mm(quantize_blockwise(dy[start:end], act), (w_q[e], w_scale[e]),
                                       block, x.dtype, ctx.backend, act)
            if dw is not None:  # dW_e = x_eᵀ dy_e, both in 128x1 tiles over this expert's tokens
                dw[e] = _token_mm(x[start:end], dy[start:end], ctx.w_dtype, ctx.backend, token)
        return dx, dw, None, None, None


def fp8_grouped_mm(x_sorted: torch.Tensor, w_stacked: torch.Tensor, offs: torch.Tensor,
                   backend: str = "auto", scaling: str = "blockwise") -> torch.Tensor:
    """FP8 counterpart of ``torch._grouped_mm(x_sorted, w_stacked, offs=offs)`` for routed experts.

    x_sorted (T, K): tokens sorted by expert; w_stacked (E, K, N): expert e maps K -> N as ``x @ w[e]``
    (torch._grouped_mm's layout; an nn.Linear-style (E, N, K) stack is passed as ``w.transpose(-2, -1)``);
    offs (E,): cumulative ends of each expert's rows (``counts.cumsum(0)``). Rows past ``offs[-1]`` give zeros.
    ``scaling``: ``blockwise`` or ``tensorwise`` (one scale per expert's tokens, weight and output gradient).
    """
    return FP8GroupedMMFunction.apply(x_sorted, w_stacked, offs, _check_backend(backend), _check_scaling(scaling))
