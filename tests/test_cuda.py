"""The CUDA paths, on a CUDA GPU only (`pytest -m cuda`; `make gpu-check` runs them on a lent H200): FP8 GEMMs through
cuBLAS blockwise scaled_mm against the emulation, a bf16-mixed training step (eager and compiled blocks), absorbed
bf16 decoding against the expanded path, and the grouped expert GEMM against a per-expert loop. Without CUDA every
test here is skipped.

They run on the GPU machine's own Python and torch (2.11 there, 2.13 here), which has torch, transformers and
safetensors but maybe not Lightning, datasets or pydantic: they import only dsv3.model, dsv3.fp8 and dsv3.infer
modules (see `submodule`) and feature-detect what depends on the torch version.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch

from tests.toy_model import toy_config

# every test is marked cuda (selected by `pytest -m cuda`) and skipped on a machine without a CUDA device
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU (torch {torch.__version__})"),
]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from gpu_check import submodule  # noqa: E402 - dsv3 modules without the packages this machine may lack

SMOKE_SHAPE = dict(  # recipes/smoke.yaml's model
    vocab_size=512, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1,
    max_position_embeddings=64,
)  # fmt: skip


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------- FP8 scaled_mm


def fp8_linear_module():
    """dsv3.fp8.linear where torch.nn.functional.scaled_mm runs the blockwise recipes here, else skip saying why."""
    F = torch.nn.functional
    if not hasattr(F, "scaled_mm") or not hasattr(getattr(F, "ScalingType", None), "BlockWise128x128"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with blockwise ScalingType")
    linear = submodule("dsv3.fp8.linear")
    if not linear.scaled_mm_supported("cuda"):
        major, minor = torch.cuda.get_device_capability()
        pytest.skip(f"blockwise scaled_mm needs sm_90 and CUDA >= 12.9; this is sm_{major}{minor}, CUDA {torch.version.cuda}")
    return linear


@pytest.mark.parametrize(
    "tokens, d_in, d_out, dtype",
    [(1024, 7168, 2048, torch.float32), (1024, 7168, 2048, torch.bfloat16), (300, 384, 320, torch.float32)],
)
def test_fp8_scaled_mm_gemms_equal_the_emulated_ones(tokens, d_in, d_out, dtype):
    """Forward, dgrad and wgrad of FP8LinearFunction with backend scaled_mm (cuBLAS) against backend emulated.

    The bound: both backends multiply the very same E4M3 operands and FP32 scales (the emulation dequantises the
    (q, scale) pairs quantize_blockwise returns), so they differ only in summation. The emulation sums in FP32;
    Hopper's FP8 tensor cores keep about 14 bits while accumulating one 128-wide K block (DeepSeek-V3 §3.3.2) and
    cuBLAS adds the scaled blocks in FP32. One block's sum of at most 128 products is then off by at most
    128 · 2^-14 = 2^-7 of the sum of their absolute values, and FP32 adds at most K · 2^-24 of it, so elementwise
        |C_scaled_mm - C_emulated| <= (2^-7 + K · 2^-24) · (|Â| |B̂|ᵀ).
    Both also stay within the product bound of tests/test_fp8_linear.py against the FP32 GEMMs (300 × 384 × 320
    exercises the zero padding to multiples of 128; 7168 × 2048 is an issue-5 shape). With bf16 activations and output
    gradients (as under bf16 autocast) y and dx come back in bf16, each rounded once (2^-9 relative): 2 · 2^-8 |C| more
    elementwise, 2^-8 more on the relative bound.
    """
    linear = fp8_linear_module()
    quant = submodule("dsv3.fp8.quant")
    ACT, WEIGHT, TOKEN = linear.ACT_BLOCK, linear.WEIGHT_BLOCK, linear.TOKEN_BLOCK

    def fq(t, block):
        return quant.dequantize_blockwise(*quant.quantize_blockwise(t, block), block)

    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(tokens, d_in, device="cuda", generator=g).to(dtype)
    w = torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5  # the FP32 master weight
    dy = torch.randn(tokens, d_out, device="cuda", generator=g).to(dtype)

    def run(backend):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        if backend:
            y = linear.FP8LinearFunction.apply(xg, wg, None, backend)
            y.backward(dy)
        else:  # FP32 GEMMs of the same inputs
            y = xg.float() @ wg.t()
            y.backward(dy.float())
        return {"forward": y.detach(), "dgrad": xg.grad, "wgrad": wg.grad}

    emulated, cublas, fp32 = run("emulated"), run("scaled_mm"), run(None)
    gemms = {  # C = A Bᵀ: (A, Â, B, B̂) with the blocks FP8LinearFunction quantises each operand in
        "forward": (x, fq(x, ACT), w, fq(w, WEIGHT)),  # y = x Wᵀ
        "dgrad": (dy, fq(dy, ACT), w.t(), fq(w, WEIGHT).t()),  # dx = dy W, W in its forward 128x128 blocks
        "wgrad": (dy.t(), fq(dy, TOKEN).t(), x.t(), fq(x, TOKEN).t()),  # dW = dyᵀ x, 128x1 tiles along tokens
    }
    for name, (a, a_hat, b, b_hat) in gemms.items():
        rounding = 2**-8 if cublas[name].dtype == torch.bfloat16 else 0.0  # one bf16 rounding of the output
        diff = (cublas[name].float() - emulated[name].float()).abs()
        accumulation = (2**-7 + a.shape[1] * 2**-24) * (a_hat.abs() @ b_hat.abs().t())
        allowed = accumulation + 2 * rounding * emulated[name].float().abs()  # both outputs rounded once
        worst = float((diff / allowed.clamp(min=1e-30)).max())
        assert worst <= 1, f"{name}: the largest difference is {worst:.3g} of the bound"
        e_a, e_b = rel(a_hat, a), rel(b_hat, b)
        bound = min(e_a + e_b + e_a * e_b, 2**-3) + rounding
        assert rel(cublas[name], fp32[name]) <= bound and rel(emulated[name], fp32[name]) <= bound, name


# --------------------------------------------------------------------------------- bf16-mixed training


def bf16_training_losses(model, ids: torch.Tensor, steps: int) -> list[float]:
    """`steps` AdamW steps of the pretraining objective (CE + 0.3 · MTP + balance) under bf16 autocast, FP32 master
    weights, gradient clip 1.0, on one fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
            loss = out.loss + 0.3 * out.mtp_losses.mean() + out.balance_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def smoke_model():
    from dsv3.model import DSV3ForCausalLM

    torch.manual_seed(0)
    return DSV3ForCausalLM(toy_config(**SMOKE_SHAPE)).cuda().train()


def test_bf16_mixed_training_steps_are_finite_and_lower_the_loss():
    model = smoke_model()
    ids = torch.randint(0, SMOKE_SHAPE["vocab_size"], (4, 64), device="cuda")
    losses = bf16_training_losses(model, ids, steps=8)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay FP32
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in model.moe_gates())


def test_compiled_blocks_train_like_eager_in_bf16():
    """compile_blocks on CUDA (Triton kernels, bf16 grouped GEMM traced as torch._grouped_mm): the same losses as the
    eager model from the same weights, within bf16 rounding, and no graph break."""
    from torch._dynamo.utils import counters

    compile_blocks = submodule("dsv3.train.compile").compile_blocks
    eager = smoke_model()
    compiled = compile_blocks(copy.deepcopy(eager))
    ids = torch.randint(0, SMOKE_SHAPE["vocab_size"], (4, 64), device="cuda")
    breaks = sum(counters["graph_break"].values())
    losses, losses_compiled = bf16_training_losses(eager, ids, 4), bf16_training_losses(compiled, ids, 4)
    assert losses_compiled == pytest.approx(losses, abs=2e-2), (losses, losses_compiled)
    assert losses_compiled[-1] < losses_compiled[0]
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


# ------------------------------------------------------------------------------------ absorbed decoding


@pytest.mark.parametrize("rope", ["default", "yarn"])
@torch.no_grad()
def test_absorbed_bf16_decoding_equals_the_expanded_path(rope):
    """Six decode steps and a 3-token chunk in bf16 on CUDA: the absorbed path's logits are as close to an FP32
    reference as the expanded path's (bf16 rounding, ~2^-8 per operation, is all that separates them)."""
    from dsv3.model import DSV3ForCausalLM

    absorb_attention = submodule("dsv3.infer.absorbed").absorb_attention
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}  # fmt: skip
    extra = {"rope_parameters": yarn} if rope == "yarn" else {}
    torch.manual_seed(0)
    config = toy_config(vocab_size=96, num_attention_heads=4, q_lora_rank=24, initializer_range=0.1,
                        max_position_embeddings=64, **extra)  # fmt: skip
    reference = absorb_attention(DSV3ForCausalLM(config).cuda().eval(), enabled=False)  # FP32, expanded
    expanded = absorb_attention(copy.deepcopy(reference).to(torch.bfloat16), enabled=False)
    absorbed = absorb_attention(copy.deepcopy(expanded))
    models = {"reference": reference, "expanded": expanded, "absorbed": absorbed}
    ids = torch.randint(0, 96, (2, 9), device="cuda")
    outs = {name: m(ids, use_cache=True) for name, m in models.items()}
    caches = {name: out.cache for name, out in outs.items()}
    feeds = [None] * 6 + [torch.randint(0, 96, (2, 3), device="cuda")]
    for feed in feeds:
        step = outs["reference"].logits[:, -1:].argmax(dim=-1) if feed is None else feed
        outs = {name: m(step, cache=caches[name]) for name, m in models.items()}
        ref = outs["reference"].logits
        err_absorbed, err_expanded = rel(outs["absorbed"].logits, ref), rel(outs["expanded"].logits, ref)
        assert err_absorbed <= 2 * err_expanded + 2**-8, (err_absorbed, err_expanded)
        assert rel(outs["absorbed"].logits, outs["expanded"].logits) <= 2**-4


# --------------------------------------------------------------------------------------- grouped GEMM


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_gemm_equals_the_per_expert_loop(dtype):
    """GroupedExperts (torch._grouped_mm) on CUDA against a loop of per-expert matmuls in FP32, output and every
    gradient; an expert without tokens included. Tolerance: bf16 rounding of inputs and outputs (2^-7 relative),
    FP32 accumulation differences (1e-5)."""
    from dsv3.model.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(6, 256, 128).cuda()
    for p in experts.parameters():
        p.data.normal_(0, 0.05)
    experts = experts.to(dtype)
    counts = torch.tensor([50, 0, 120, 7, 33, 64], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(x.shape, device="cuda", dtype=dtype)
    try:
        y = experts(x, counts)
    except RuntimeError as error:  # e.g. a torch whose CUDA grouped GEMM takes bf16 only
        pytest.skip(f"torch {torch.__version__}: torch._grouped_mm on this GPU refuses {dtype}: {str(error).splitlines()[0]}")
    y.backward(g)
    grads = (x.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    x32 = x.detach().float().requires_grad_()
    w1, w2 = (w.detach().float().requires_grad_() for w in (experts.gate_up_proj, experts.down_proj))
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, up = (x32[start : start + n] @ w1[e].T).chunk(2, dim=-1)
        rows.append((torch.nn.functional.silu(gate) * up) @ w2[e].T)
        start += n
    loop = torch.cat(rows)
    loop.backward(g.float())
    tolerance = 2**-7 if dtype == torch.bfloat16 else 1e-5
    assert rel(y, loop) <= tolerance
    for ours, reference in zip(grads, (x32.grad, w1.grad, w2.grad), strict=True):
        assert rel(ours, reference) <= tolerance
    assert experts.gate_up_proj.grad[1].abs().max() == 0  # the idle expert
