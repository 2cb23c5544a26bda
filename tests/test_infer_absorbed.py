"""dsv3/infer/absorbed.py: absorbed MLA decoding equals the expanded path; the cache holds d_c + d_R per token."""

import copy

import pytest
import torch

from dsv3.infer.absorbed import (
    absorb_attention,
    cache_bytes,
    mla_cache_bytes_per_token,
    uses_absorbed_attention,
)
from dsv3.model import DSV3ForCausalLM
from dsv3.model.attention import MultiHeadLatentAttention
from tests.toy_model import toy_config

BASE = dict(
    vocab_size=96,
    num_attention_heads=4,
    q_lora_rank=1536,
    initializer_range=0.1,
    num_nextn_predict_layers=1,
    max_position_embeddings=64,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}
CONFIGS = {
    "q_lora": dict(q_lora_rank=24),
    "no_q_lora": dict(q_lora_rank=None),
    "yarn+q_lora": dict(q_lora_rank=24, rope_parameters=YARN),
    "yarn+no_q_lora": dict(q_lora_rank=None, rope_parameters=YARN),
}




def models(**overrides) -> tuple[DSV3ForCausalLM, DSV3ForCausalLM]:
    torch.manual_seed(0)
    expanded = absorb_attention(DSV3ForCausalLM(toy_config(**BASE | overrides)).eval(), enabled=False)
    return expanded, absorb_attention(copy.deepcopy(expanded))


def test_models_decode_absorbed_by_default():
    """`generate` on a model as built or loaded uses the absorbed path: nothing to switch on."""
    assert uses_absorbed_attention(DSV3ForCausalLM(toy_config(**BASE)))


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_absorbed_decode_logits_equal_the_expanded_path(name):
    expanded, absorbed = models(**CONFIGS[name])
    ids = torch.randint(0, 96, (2, 9))
    ref, out = expanded(ids, use_cache=True), absorbed(ids, use_cache=True)
    ref_cache, cache = ref.cache, out.cache
    for _ in range(6):  # one token per step, fed from the expanded model's greedy choice
        step = ref.logits[:, -1:].argmax(dim=-1)
        ref, out = expanded(step, cache=ref_cache), absorbed(step, cache=cache)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    chunk = torch.randint(0, 96, (2, 3))  # several queries at once, as speculative verification feeds them
    ref, out = expanded(chunk, cache=ref_cache), absorbed(chunk, cache=cache)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.layers[1].keys, ref_cache.layers[1].keys, atol=1e-5, rtol=0)


@torch.no_grad()
def test_absorbed_decoding_with_left_padding_matches_expanded_generate():
    expanded, absorbed = models(q_lora_rank=24)
    ids = torch.randint(2, 96, (2, 6))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(absorbed.generate(ids, **kwargs), expanded.generate(ids, **kwargs))


def test_absorb_attention_switches_every_mla_module_and_back():
    expanded, absorbed = models(q_lora_rank=None)
    assert uses_absorbed_attention(absorbed) and not uses_absorbed_attention(expanded)
    n_attn = sum(isinstance(m, MultiHeadLatentAttention) and m.absorb for m in absorbed.modules())
    assert n_attn == 3  # two blocks and the MTP module
    assert absorbed.state_dict().keys() == expanded.state_dict().keys()
    assert not uses_absorbed_attention(absorb_attention(absorbed, enabled=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cache_allocates_exactly_latent_plus_rope_key_per_token(dtype):
    _, model = models(q_lora_rank=None)
    model.to(dtype)
    ids = torch.randint(0, 96, (1, 11))
    out = model(ids, use_cache=True)
    for _ in range(3):
        out = model(out.logits[:, -1:].argmax(-1), cache=out.cache)
    per_token = mla_cache_bytes_per_token(model.config, dtype)
    assert per_token == (16 + 8) * torch.empty((), dtype=dtype).element_size()
    expected = model.config.num_hidden_layers * 14 * per_token
    assert cache_bytes(out.cache) == expected
    storage = sum(
        t.untyped_storage().nbytes()
        for layer in out.cache.layers
        for t in (layer.keys, layer.values)
    )
    assert storage == expected  # nothing else allocated: no expanded keys or values kept
