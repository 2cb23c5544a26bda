"""dsv3/model/hf.py: export-hf / import-hf against transformers' DeepseekV3ForCausalLM, fp32 logit parity."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.hf import export_hf, import_hf

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    initializer_range=0.1,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
)
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
}
CONFIGS = {
    "q_lora+groups+dense_first+mtp": dict(
        q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, num_nextn_predict_layers=1
    ),
    "no_q_lora+no_groups+all_moe": dict(
        q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0, num_nextn_predict_layers=0
    ),
    "yarn+groups": dict(
        q_lora_rank=24,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        rope_parameters=YARN,
    ),
    "tied+unnormalised_topk": dict(
        q_lora_rank=None,
        n_group=4,
        topk_group=3,
        first_k_dense_replace=2,
        norm_topk_prob=False,
        tie_word_embeddings=True,
        num_nextn_predict_layers=0,
    ),
}
TOKENS = 40  # beyond the YaRN config's original length of 16


def load_transformers(directory) -> DeepseekV3ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", experts_implementation="eager"
    ).eval()


def max_logit_difference(ours, theirs) -> float:
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, TOKENS))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert a.std() > 0.1  # logits large enough for the comparison to mean something
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", CONFIGS)
def test_export_hf_gives_transformers_the_same_logits(name, tmp_path):
    torch.manual_seed(0)
    ours = DSV3ForCausalLM(DSV3Config(**BASE, **CONFIGS[name])).eval()
    for gate in ours.moe_gates():
        gate.e_score_correction_bias.normal_(0, 0.05)
    ours.save_pretrained(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "deepseek_v3"
    theirs = load_transformers(tmp_path / "hf")
    assert isinstance(theirs, DeepseekV3ForCausalLM)
    bias = theirs.model.layers[-1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(
        bias, ours.model.layers[BASE["num_hidden_layers"] - 1].mlp.gate.e_score_correction_bias
    )
    assert max_logit_difference(ours, theirs) <= 1e-4


@pytest.mark.parametrize("name", ["q_lora+groups+dense_first+mtp", "yarn+groups"])
def test_import_hf_from_a_transformers_directory(name, tmp_path):
    fields = {**BASE, **CONFIGS[name]}
    fields["num_mtp_layers"] = fields.pop("num_nextn_predict_layers")
    torch.manual_seed(0)
    theirs = DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).eval()
    for layer in theirs.model.layers[fields["first_k_dense_replace"] :]:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = DSV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert ours.config.num_nextn_predict_layers == 0  # transformers saves no MTP weights
    theirs = load_transformers(tmp_path / "hf")
    assert max_logit_difference(ours, theirs) <= 1e-4


def test_export_then_import_restores_every_tensor(tmp_path):
    torch.manual_seed(0)
    ours = DSV3ForCausalLM(DSV3Config(**BASE, **CONFIGS["q_lora+groups+dense_first+mtp"]))
    ours.moe_gates()[-1].e_score_correction_bias.normal_()
    ours.save_pretrained(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = DSV3ForCausalLM.from_pretrained(tmp_path / "back")
    assert back.config.num_nextn_predict_layers == 1
    original = ours.state_dict()
    for key, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[key]), key


def test_unsupported_configs_fail_clearly(tmp_path):
    torch.manual_seed(0)
    DSV3ForCausalLM(
        DSV3Config(**BASE, q_lora_rank=None, n_group=1, topk_group=1, scoring_func="softmax")
    ).save_pretrained(tmp_path / "softmax")
    with pytest.raises(ValueError, match="sigmoid"):
        export_hf(tmp_path / "softmax", tmp_path / "out")
    with pytest.raises(ValueError, match="missing is not a directory"):
        import_hf(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 2})
    )
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="deepseek_v3"):
        import_hf(tmp_path / "llama", tmp_path / "out")
