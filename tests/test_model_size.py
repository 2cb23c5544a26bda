"""The paper's model (report §4.2, DeepSeek's released config.json) built on the meta device: 671B / 37B / MTP."""

from dsv3.config import load_recipe
from dsv3.model import DSV3Config, count_parameters
from tests.conftest import RECIPES

V3 = dict(
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    first_k_dense_replace=3,
    num_attention_heads=128,
    n_routed_experts=256,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=8,
    topk_group=4,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    num_nextn_predict_layers=1,
    routed_scaling_factor=2.5,
)


def test_deepseek_v3_counts_671b_total_37b_active(capsys):
    counts = count_parameters(DSV3Config(**V3))
    assert abs(counts["total"] / 671e9 - 1) <= 0.005
    assert abs(counts["active"] / 37e9 - 1) <= 0.03
    # one MTP module: a MoE block (~11.1B routed) + eh_proj + norms; DeepSeek's 14B adds the embedding and head copies
    assert 11e9 < counts["mtp"] < 12e9
    with capsys.disabled():
        print(
            f"\nDeepSeek-V3: {counts['total'] / 1e9:.2f}B total, {counts['active'] / 1e9:.2f}B active per token, "
            f"MTP module {counts['mtp'] / 1e9:.2f}B (shared embedding and head not counted)"
        )


def test_small_recipe_counts_288m_total_106m_active(capsys):
    """recipes/small.yaml (the one-GPU run) as its header states: 287.7M total, 106.0M active, within 100-300M."""
    recipe = load_recipe(RECIPES / "small.yaml")
    fields = recipe.model.model_dump(exclude={"rope_scaling", "rope_theta"})
    fields["vocab_size"] = fields["vocab_size"] or recipe.tokenizer.vocab_size  # null = the tokenizer's
    counts = count_parameters(DSV3Config(**fields))
    assert 100e6 <= counts["total"] <= 300e6
    assert abs(counts["total"] / 287.7e6 - 1) <= 0.001
    assert abs(counts["active"] / 106.0e6 - 1) <= 0.001
    assert abs(counts["mtp"] / 22.3e6 - 1) <= 0.002
    with capsys.disabled():
        print(
            f"\nsmall.yaml: {counts['total'] / 1e6:.1f}M total, {counts['active'] / 1e6:.1f}M active per token, "
            f"MTP module {counts['mtp'] / 1e6:.1f}M"
        )
