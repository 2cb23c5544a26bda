"""dsv3/model/attention.py and the masks of model.py: MLA equations, causality, document and padding masks."""

import torch
from transformers.cache_utils import DynamicCache

from dsv3.model import DSV3Config
from dsv3.model.attention import MultiHeadLatentAttention
from dsv3.model.model import attention_mask_4d, document_ids
from dsv3.model.rope import RotaryEmbedding, apply_rotary_emb


def mla(**overrides) -> tuple[MultiHeadLatentAttention, RotaryEmbedding]:
    fields = dict(
        hidden_size=32,
        num_attention_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=6,
        n_routed_experts=8,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
    )
    config = DSV3Config(**{**fields, **overrides})
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(config, 0)
    for p in attn.parameters():
        p.data.normal_(0, 0.2) if p.ndim > 1 else p.data.fill_(1.0)
    return attn, RotaryEmbedding(config.rope_parameters, config.qk_rope_head_dim)


def naive_mla(attn: MultiHeadLatentAttention, x, cos, sin) -> torch.Tensor:
    """Eqs. 1-11 written out per head with an explicit causal softmax."""
    B, T, _ = x.shape
    H, dn, dr, dv = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    c_kv, k_r = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, dr], -1)
    c_kv = attn.kv_a_layernorm(c_kv)  # eq. 1
    k_r = apply_rotary_emb(k_r[:, None], cos, sin)[:, 0]  # eq. 3, (B, T, dr)
    w_uk, w_uv = attn.kv_b_proj.weight.view(H, dn + dv, -1).split([dn, dv], 1)
    c_q = attn.q_a_layernorm(attn.q_a_proj(x))  # eq. 6
    q = attn.q_b_proj(c_q).view(B, T, H, dn + dr)
    outputs = []
    for h in range(H):
        k_c = c_kv @ w_uk[h].T  # eq. 2
        v_c = c_kv @ w_uv[h].T  # eq. 5
        q_c, q_r = q[:, :, h, :dn], apply_rotary_emb(q[:, None, :, h, dn:], cos, sin)[:, 0]  # eqs. 7-8
        scores = (q_c @ k_c.transpose(1, 2) + q_r @ k_r.transpose(1, 2)) / (dn + dr) ** 0.5  # eqs. 4, 9, 10
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(scores.softmax(-1) @ v_c)
    return attn.o_proj(torch.cat(outputs, -1))  # eq. 11


def test_mla_equals_the_equations_written_out():
    attn, rope = mla()
    x = torch.randn(2, 7, 32)
    cos, sin = rope(torch.arange(7)[None].expand(2, 7))
    torch.testing.assert_close(attn(x, cos, sin, None), naive_mla(attn, x, cos, sin), atol=1e-5, rtol=1e-5)


def test_without_query_compression_uses_a_plain_projection():
    attn, rope = mla(q_lora_rank=None)
    assert not hasattr(attn, "q_a_proj") and attn.q_proj.out_features == 4 * 16
    cos, sin = rope(torch.arange(5)[None])
    assert attn(torch.randn(1, 5, 32), cos, sin, None).shape == (1, 5, 32)


def test_causal_outputs_ignore_future_tokens():
    attn, rope = mla()
    x = torch.randn(1, 8, 32)
    cos, sin = rope(torch.arange(8)[None])
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 32)
    torch.testing.assert_close(attn(x, cos, sin, None)[:, :5], attn(y, cos, sin, None)[:, :5])


def test_cache_stores_576_values_per_token_at_v3_sizes():
    attn, rope = mla(
        hidden_size=64, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64
    )
    cache = DynamicCache()
    cos, sin = rope(torch.arange(3)[None])
    attn(torch.randn(1, 3, 64), cos, sin, None, cache)
    layer = cache.layers[0]
    assert layer.keys.shape[-1] + layer.values.shape[-1] == 576


def test_document_ids_and_block_diagonal_mask():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert document_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2]]
    mask = attention_mask_4d(positions, None, 0)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert attention_mask_4d(torch.arange(6)[None], None, 0) is None  # plain causal
    assert attention_mask_4d(torch.arange(6)[None], torch.ones(1, 6), 0) is None


def test_padding_combines_with_documents_and_cache():
    positions = torch.tensor([[1, 1, 0, 1, 0, 1]])  # two left pads, then documents [2:4] and [4:6]
    padding = torch.tensor([[0, 0, 1, 1, 1, 1]])
    mask = attention_mask_4d(positions, padding, 0)[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False]
    assert mask[5].tolist() == [False, False, False, False, True, True]
    assert mask[0].tolist() == [
        True,
        False,
        False,
        False,
        False,
        False,
    ]  # a pad sees only itself: finite softmax
    step = attention_mask_4d(torch.tensor([[6]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), past_len=6)[0, 0]
    assert step.tolist() == [[False, False, True, True, True, True, True]]  # decoding ignores restarts
