"""Per-tensor FP8 scaling, the baseline of the FP8 ablation (`pretrain.precision: fp8-tensorwise`): every GEMM operand
of the FP8 linear and of each routed expert carries exactly one scale; the recipe reaches the plugin with it; it is
coarser than the paper's 1x128 / 128x128 blocks where the blocks matter (an outlier channel); and its scaled_mm
path equals its emulation."""

import pytest
import torch

import dsv3.fp8.linear as fp8_linear
from dsv3.config import PretrainSection
from dsv3.fp8 import (
    TENSOR,
    FP8BlockwisePrecision,
    FP8Linear,
    convert_to_fp8,
    dequantize_blockwise,
    fp8_grouped_mm,
    fp8_modules,
    fp8_scaling,
    quantize_blockwise,
)
from dsv3.fp8.linear import fp8_mm, resolve_backend
from dsv3.model import DSV3ForCausalLM
from dsv3.train import LoopSettings
from dsv3.train.fit import build_trainer
from tests.toy_model import toy_config


@pytest.fixture
def scales(monkeypatch):
    """Every (operand shape, block, scale shape) the FP8 layers quantise while the test runs."""
    seen = []
    real = fp8_linear.quantize_blockwise

    def spy(x, block=(1, 128), power_of_two=False):
        q, scale = real(x, block, power_of_two)
        seen.append((tuple(x.shape), block, tuple(scale.shape)))
        return q, scale

    monkeypatch.setattr(fp8_linear, "quantize_blockwise", spy)
    return seen


def test_tensor_block_is_one_scale_per_matrix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 520, generator=g)
    q, scale = quantize_blockwise(x, TENSOR)
    assert scale.shape == (1, 1) and scale.item() == pytest.approx(x.abs().max().item() / 448, rel=1e-6)
    stack = torch.randn(3, 256, 384, generator=g)
    _, per_expert = quantize_blockwise(stack, TENSOR)
    assert per_expert.shape == (3, 1, 1)
    assert torch.allclose(per_expert.flatten(), stack.abs().amax(dim=(1, 2)) / 448)
    assert (dequantize_blockwise(q, scale, TENSOR) - x).abs().max() <= x.abs().max() / 16


@pytest.mark.parametrize("scaling, many", [("tensorwise", False), ("blockwise", True)])
def test_linear_quantises_each_operand_with_one_scale(scales, scaling, many):
    """Forward (x, W), activation gradient (dy) and weight gradient (dy, x again): one scale each when tensorwise;
    the same spy sees several blocks per operand when blockwise, so it would catch a per-block scale."""
    layer = FP8Linear(512, 384, bias=False, backend="emulated", scaling=scaling)
    x = torch.randn(2, 160, 512, requires_grad=True)
    layer(x).square().mean().backward()
    assert len(scales) == 5  # x, W | dy | dy, x
    shapes = [scale[-2:] for _, _, scale in scales]
    if many:
        assert all(s != (1, 1) for s in shapes)
    else:
        assert all(s == (1, 1) for s in shapes) and all(block == TENSOR for _, block, _ in scales)
    assert x.grad is not None and layer.weight.grad is not None


def test_experts_quantise_each_experts_tokens_weight_and_gradient_with_one_scale(scales):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 256, generator=g, requires_grad=True)
    w = torch.randn(4, 256, 384, generator=g, requires_grad=True)
    offs = torch.tensor([60, 60, 150, 200])  # expert 1 has no token
    fp8_grouped_mm(x, w, offs, "emulated", "tensorwise").square().mean().backward()
    weight = [s for shape, _, s in scales if shape == (4, 256, 384)]
    assert weight == [(4, 1, 1)]  # one scale per expert's weight
    others = [s for shape, _, s in scales if shape != (4, 256, 384)]
    assert len(others) == 3 * 4  # experts 0, 2, 3: forward x_e, dgrad dy_e, wgrad x_e and dy_e
    assert all(s == (1, 1) for s in others)


def test_recipe_precision_reaches_the_trainer_and_a_training_step_uses_one_scale_per_matrix(scales, tmp_path):
    """pretrain.precision fp8-tensorwise -> the precision plugin Lightning gets -> every converted layer tensorwise,
    and a training step of such a model quantises nothing with more than one scale per matrix."""
    section = PretrainSection(steps=1, global_batch_size=2, micro_batch_size=2, precision="fp8-tensorwise")
    assert fp8_scaling(section.precision) == "tensorwise"
    assert fp8_scaling("fp8-blockwise") == "blockwise" and fp8_scaling("bf16-mixed") is None
    trainer = build_trainer(LoopSettings.from_pretrain(section), tmp_path, 1, 1, [], False)
    (plugin,) = [p for p in [trainer.precision_plugin] if isinstance(p, FP8BlockwisePrecision)]
    assert plugin.scaling == "tensorwise"

    model = DSV3ForCausalLM(toy_config(vocab_size=64, hidden_size=256, intermediate_size=384, moe_intermediate_size=128))
    plugin.convert_module(model)
    layers = dict(model.named_modules())
    assert fp8_modules(model) and all(layers[name].scaling == "tensorwise" for name in fp8_modules(model))
    ids = torch.randint(0, 64, (2, 16))
    with plugin.forward_context():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    assert scales and all(scale[-2:] == (1, 1) for _, _, scale in scales)


def quantisation_error(outlier: float) -> dict:
    """Relative error of the entries outside the outlier's tiles, per scaling, with channel 7 `outlier` times the rest."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 512, generator=g)
    x[:, 7] *= outlier
    small = torch.ones_like(x, dtype=torch.bool)
    small[:, :128] = False  # the tiles holding the outlier channel
    errors = {}
    for block in ((1, 128), TENSOR):
        back = dequantize_blockwise(*quantize_blockwise(x, block), block)
        errors[block] = ((back - x)[small].norm() / x[small].norm()).item()
    return errors


def test_tensorwise_is_coarser_than_blockwise_around_an_outlier_channel():
    """E4M3 spans 448 / 2^-9 ≈ 2^17.8 with its subnormals: an outlier 100x the rest costs per-tensor scaling nothing,
    one 10^5x flushes the small values (their scale is set by the outlier) while 1x128 tiles without it keep full
    resolution (half a step: ≈ 2.6% relative for Gaussian data)."""
    mild, extreme = quantisation_error(1e2), quantisation_error(1e5)
    assert mild[TENSOR] == pytest.approx(mild[(1, 128)], rel=0.1)
    assert extreme[(1, 128)] == mild[(1, 128)] < 0.03
    assert extreme[TENSOR] > 10 * extreme[(1, 128)]


def test_tensorwise_scaled_mm_equals_its_emulation_on_cpu():
    """torch's TensorWise scaled_mm runs on CPUs (torch 2.13): the GPU path's numerics, checked here."""
    g = torch.Generator().manual_seed(3)
    a = quantize_blockwise(torch.randn(40, 200, generator=g), TENSOR)
    b = quantize_blockwise(torch.randn(72, 200, generator=g), TENSOR)
    emulated = fp8_mm(a, b, TENSOR, torch.float32, "emulated", TENSOR)
    kernel = fp8_mm(a, b, TENSOR, torch.float32, "scaled_mm", TENSOR)
    assert torch.allclose(kernel, emulated, rtol=1e-5, atol=1e-4)
    assert resolve_backend("auto", "cpu", "tensorwise") == "emulated"
    assert resolve_backend("scaled_mm", "cpu", "tensorwise") == "scaled_mm"
    with pytest.raises(ValueError, match="scaling"):
        convert_to_fp8(DSV3ForCausalLM(toy_config(vocab_size=64)), "emulated", "rowwise")
