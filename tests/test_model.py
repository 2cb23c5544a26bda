"""dsv3/model/model.py: the causal LM: outputs, masks (packing, padding), cache, generate, save/load, heads."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from dsv3.model import DSV3Config, DSV3ForCausalLM, DSV3ForSequenceClassification


def tiny_config(**overrides) -> DSV3Config:
    fields = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        num_nextn_predict_layers=1,
        initializer_range=0.1,
        pad_token_id=0,
    )
    return DSV3Config(**{**fields, **overrides})


def tiny_model(**overrides) -> DSV3ForCausalLM:
    torch.manual_seed(0)
    return DSV3ForCausalLM(tiny_config(**overrides)).eval()


def test_forward_outputs_and_loss():
    model = tiny_model()
    ids = torch.randint(1, 96, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 10, 96)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.mtp_losses.shape == (1,) and out.balance_loss.ndim == 0 and out.balance_loss > 0
    assert out.expert_load.shape == (2, 8) and out.expert_load.sum().item() == 2 * 20 * 2
    no_labels = model(ids)
    assert no_labels.loss is None and no_labels.mtp_losses is None
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 96)


def test_backward_reaches_every_parameter():
    model = tiny_model().train()
    ids = torch.randint(1, 96, (2, 12))
    out = model(ids, labels=ids)
    (out.loss + 0.3 * out.mtp_losses.mean() + out.balance_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_state_dict_names_follow_deepseek():
    keys = set(tiny_model(q_lora_rank=None).state_dict())
    for key in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.1.self_attn.kv_a_layernorm.weight",
        "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.2.mlp.experts.gate_up_proj",
        "model.layers.3.enorm.weight",
        "model.layers.3.hnorm.weight",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.shared_head.norm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert key in keys, key
    assert not any("rotary" in k for k in keys)


def test_moe_gates_for_the_balancer():
    model = tiny_model()
    gates = model.moe_gates()
    assert len(gates) == 3  # layers 1, 2 and the MTP module
    model(torch.randint(1, 96, (1, 6)))
    assert gates[0].expert_load.sum().item() == 12
    gates[0].e_score_correction_bias += 0.5
    assert model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"][0].item() == 0.5


def test_packed_row_equals_each_document_alone():
    model = tiny_model()
    a, b = torch.randint(1, 96, (1, 7)), torch.randint(1, 96, (1, 5))
    packed = model(
        torch.cat((a, b), 1), position_ids=torch.cat((torch.arange(7), torch.arange(5)))[None]
    ).logits
    torch.testing.assert_close(packed[:, :7], model(a).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 7:], model(b).logits, atol=1e-5, rtol=1e-5)
    unmasked = model(torch.cat((a, b), 1)).logits
    assert not torch.allclose(unmasked[:, 7:], model(b).logits, atol=1e-3)


def test_left_padding_equals_unpadded():
    model = tiny_model()
    ids = torch.randint(1, 96, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), 1)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)), 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(out[:, 3:], model(ids).logits, atol=1e-5, rtol=1e-5)


def test_cache_holds_latent_and_rope_key_only():
    config = tiny_config()
    model = tiny_model()
    out = model(torch.randint(1, 96, (2, 5)), use_cache=True)
    layer = out.cache.layers[0]
    assert layer.keys.shape == (2, 1, 5, config.kv_lora_rank)
    assert layer.values.shape == (2, 1, 5, config.qk_rope_head_dim)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])  # transformers >= 5.24 passes cache=
@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}])
def test_cached_decoding_equals_full_forward(overrides, keyword):
    model = tiny_model(**overrides)
    ids = torch.randint(1, 96, (2, 9))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(4, 9):
        out = model(ids[:, t : t + 1], use_cache=True, **{keyword: cache})
        steps.append(out.logits)
        assert out.cache is cache and cache.get_seq_length() == t + 1
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_passing_the_cache_twice_is_an_error():
    model = tiny_model()
    cache = model(torch.randint(1, 96, (1, 3)), use_cache=True).cache
    other = model(torch.randint(1, 96, (1, 3)), use_cache=True).cache
    with pytest.raises(ValueError, match="not both"):
        model(torch.randint(1, 96, (1, 1)), cache=cache, past_key_values=other)


def test_generate_greedy_matches_uncached_argmax_with_left_padding(caplog, recwarn):
    model = tiny_model()
    prompt = torch.randint(1, 96, (1, 5))
    padded = torch.cat((torch.zeros(1, 2, dtype=torch.long), prompt), 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    batch = torch.cat((padded, torch.randint(1, 96, (1, 7))), 0)
    batch_mask = torch.cat((mask, torch.ones(1, 7, dtype=torch.long)), 0)
    fed = []  # tokens each forward of the decoder receives: the prompt once, then one per step via the cache
    model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    with caplog.at_level("WARNING"):
        generated = model.generate(
            batch, attention_mask=batch_mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert fed == [7, 1, 1, 1, 1, 1], "generate ran without the KV cache"
    assert not [r for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert not [w for w in recwarn if "deprecat" in str(w.message).lower()]
    seq = prompt
    for _ in range(6):
        seq = torch.cat((seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(generated[0, 2:], seq[0])


def test_save_and_auto_load_round_trip(tmp_path):
    model = tiny_model()
    model.moe_gates()[0].e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "dsv3"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DSV3ForCausalLM)
    ids = torch.randint(1, 96, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert isinstance(classifier, DSV3ForSequenceClassification)
    assert classifier(ids).logits.shape == (1, 1)


def test_bf16_model_keeps_fp32_router_bias():
    model = tiny_model().to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(g.e_score_correction_bias.dtype == torch.float32 for g in model.moe_gates())
    assert model(torch.randint(1, 96, (1, 8))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"n_group": 3}, "n_group"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ],
)
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(1, 96, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        out = model(ids, labels=ids)
        (out.loss + out.mtp_losses.sum() + out.balance_loss).backward()
        grads.append(model.model.layers[1].self_attn.kv_b_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_trains_with_an_fp32_router():
    model = tiny_model().train()
    ids = torch.randint(1, 96, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        scores = model.moe_gates()[0].affinities(torch.randn(4, 32))
    assert out.logits.dtype == torch.bfloat16 and scores.dtype == torch.float32
    (out.loss + out.mtp_losses.sum() + out.balance_loss).backward()
    assert model.model.layers[1].mlp.experts.gate_up_proj.grad.dtype == torch.float32
