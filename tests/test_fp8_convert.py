"""dsv3/fp8/convert.py: which layers become FP8 (DeepSeek-V3 section 3.3.1) and what conversion leaves alone.

Logit bound: each FP8 GEMM has a relative Frobenius error of at most about 2^-3 + 2^-8 against fp32 (derived in
tests/test_fp8_linear.py; about 3.3% measured for one random linear). Each block adds such noise to its share of
the residual stream; with initializer_range 0.02 the logits' relative error measures 2.4% and we assert it below
2^-4 (6.25%), and above zero so that a conversion that changes nothing fails. (With large weights, std 0.1, it
reaches ~24%: the noise flips routing choices, each flip swapping whole experts' outputs; that is the nature of
E4M3, not of the conversion, which the per-expert equality test pins down exactly.)
"""

import pytest
import torch
from torch import nn

from dsv3.fp8 import FP8GroupedExperts, FP8Linear, convert_to_fp8, fp8_modules
from dsv3.model.moe import GroupedExperts, Router
from tests.test_model import tiny_model

ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
SWIGLU = ["gate_proj", "up_proj", "down_proj"]


def expected_fp8_names(attention=ATTENTION) -> list[str]:
    """tiny_config: layer 0 dense, layers 1-2 MoE, layer 3 the MTP module (MoE, with eh_proj)."""
    names = [f"model.layers.0.self_attn.{a}" for a in attention] + [f"model.layers.0.mlp.{p}" for p in SWIGLU]
    for i in (1, 2, 3):
        names += [f"model.layers.{i}.self_attn.{a}" for a in attention] + [f"model.layers.{i}.mlp.experts"]
        names += [f"model.layers.{i}.mlp.shared_experts.{p}" for p in SWIGLU]
    return names + ["model.layers.3.eh_proj"]


def test_converts_exactly_the_block_linears_and_experts():
    model = convert_to_fp8(tiny_model(), "emulated")
    assert fp8_modules(model) == expected_fp8_names()
    assert all(m.backend == "emulated" for n, m in model.named_modules() if n in fp8_modules(model))


def test_plain_query_projection_is_converted():
    model = convert_to_fp8(tiny_model(q_lora_rank=None), "emulated")
    assert fp8_modules(model) == expected_fp8_names(["q_proj", *ATTENTION[2:]])


def test_embedding_head_gate_and_norms_stay_high_precision():
    model = convert_to_fp8(tiny_model(), "emulated")
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    gates = [m for m in model.modules() if isinstance(m, Router)]
    assert len(gates) == 3 and all(type(g) is Router for g in gates)
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert norms and all(type(n) is nn.RMSNorm for n in norms)
    plain = [n for n, m in model.named_modules() if type(m) in (nn.Linear, GroupedExperts)]
    assert plain == ["lm_head"]


def test_state_dict_and_parameters_are_unchanged():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    convert_to_fp8(model, "emulated")
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_logits_close_to_fp32_and_gradients_reach_every_parameter():
    reference = tiny_model(initializer_range=0.02)
    model = convert_to_fp8(tiny_model(initializer_range=0.02), "emulated")
    ids = torch.randint(1, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    out = model(input_ids=ids, labels=ids)
    error = ((out.logits.detach() - expected).norm() / expected.norm()).item()
    assert 0 < error < 2**-4
    (out.loss + out.mtp_losses.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []


def test_fp8_experts_equal_an_fp8_linear_per_expert():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 16)
    nn.init.normal_(experts.gate_up_proj, std=0.1)
    nn.init.normal_(experts.down_proj, std=0.1)
    x, counts = torch.randn(20, 32), torch.tensor([6, 0, 9, 5])
    FP8GroupedExperts.from_experts(experts, "emulated")
    got = experts(x, counts)
    rows, expected = x.split(counts.tolist()), []
    for e, x_e in enumerate(rows):
        gate_up = FP8Linear(32, 32, bias=False, backend="emulated")
        down = FP8Linear(16, 32, bias=False, backend="emulated")
        with torch.no_grad():
            gate_up.weight.copy_(experts.gate_up_proj[e])
            down.weight.copy_(experts.down_proj[e])
        gate, up = gate_up(x_e).chunk(2, dim=-1)
        expected.append(down(nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_conversion_is_idempotent_and_experts_keep_their_parameters():
    model = tiny_model()
    experts = model.model.layers[1].mlp.experts
    weight = experts.gate_up_proj
    convert_to_fp8(convert_to_fp8(model, "emulated"), "emulated")
    assert fp8_modules(model) == expected_fp8_names()
    assert isinstance(experts, FP8GroupedExperts) and experts.gate_up_proj is weight
    assert not any(isinstance(m.weight, FP8Linear) for m in model.modules() if isinstance(m, FP8Linear))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="DecoderLayer"):
        convert_to_fp8(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="backend"):
        convert_to_fp8(tiny_model(), "fp4")
