"""The toy DeepSeek-V3 shape unit tests build their models from: every part of the network (MLA, a dense layer
then MoE with routed and shared experts, RoPE and no-RoPE heads) at sizes a CPU runs in milliseconds."""

from dsv3.model import DSV3Config

TOY_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=2,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
)


def toy_config(**overrides) -> DSV3Config:
    """DSV3Config of TOY_SHAPE with `overrides` (vocab size, heads, routing, MTP depth, ...)."""
    return DSV3Config(**(TOY_SHAPE | overrides))
