"""dsv3/model/hf.py: export-hf / import-hf against transformers' DeepseekV3ForCausalLM, fp32 logit parity."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, DeepseekV3ForCausalLM

from dsv3.data import CHAT_TEMPLATE, save_tokenizer, train_tokenizer
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
    export_hf(tmp_path / "ckpt", tmp_path / "hf", with_tokenizer=False)
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
    export_hf(tmp_path / "ckpt", tmp_path / "hf", with_tokenizer=False)
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
        export_hf(tmp_path / "softmax", tmp_path / "out", with_tokenizer=False)
    with pytest.raises(ValueError, match="missing is not a directory"):
        import_hf(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 2})
    )
    (tmp_path / "llama" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="deepseek_v3"):
        import_hf(tmp_path / "llama", tmp_path / "out")


# ------------------------------------------------------------------------------------ a stage's model folder, whole

LONG = 512  # tokens: four times the YaRN model's original length
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A stage-like model folder (YaRN, MTP, trained tokenizer with chat template) and its export."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = train_tokenizer(["the quick brown fox jumps over the lazy dog. 2 + 3 = 5\n" * 20], vocab_size=300)
    save_tokenizer(tokenizer, root / "ckpt", CHAT_TEMPLATE)
    rope = YARN | {"original_max_position_embeddings": LONG // 4}
    fields = BASE | CONFIGS["yarn+groups"] | {"rope_parameters": rope, "max_position_embeddings": LONG}
    fields |= {"vocab_size": tokenizer.get_vocab_size(), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    torch.manual_seed(0)
    ours = DSV3ForCausalLM(DSV3Config(**fields)).eval()
    for gate in ours.moe_gates():
        gate.e_score_correction_bias.normal_(0, 0.05)
    ours.save_pretrained(root / "ckpt")
    export_hf(root / "ckpt", root / "hf")
    return root / "ckpt", root / "hf", ours


def test_export_loads_in_transformers_without_warnings_and_gives_our_logits(exported):
    ckpt, hf, ours = exported
    theirs, info = AutoModelForCausalLM.from_pretrained(
        hf, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # no UNEXPECTED (MTP sits in mtp.safetensors) and nothing missing
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (1, LONG))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs.eval()(ids).logits
    assert a.std() > 0.1
    assert (a - b).abs().max().item() <= 1e-4  # measured 1.4e-6 at 512 tokens (also on transformers 4.57)
    assert theirs.generation_config.eos_token_id == ours.config.eos_token_id
    assert theirs.generation_config.pad_token_id == ours.config.pad_token_id


def test_export_tokenizer_gives_our_chat_ids_and_special_tokens(exported):
    ckpt, hf, _ = exported
    ours, theirs = AutoTokenizer.from_pretrained(ckpt), AutoTokenizer.from_pretrained(hf)
    for prompt in (CHAT, CHAT[:2]):
        options = dict(add_generation_prompt=prompt[-1]["role"] == "user", return_dict=True)
        assert theirs.apply_chat_template(prompt, **options) == ours.apply_chat_template(prompt, **options)
    masks = [t.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True) for t in (ours, theirs)]
    assert masks[0]["assistant_masks"] == masks[1]["assistant_masks"] and sum(masks[1]["assistant_masks"]) > 0
    assert theirs.all_special_tokens == ours.all_special_tokens
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (0, 1, 2)


def test_export_json_is_what_transformers_4_reads(exported):
    """transformers 4.x reads YaRN only from rope_theta + rope_scaling (else it silently runs plain RoPE) and loads
    no TokenizersBackend class or extra_special_tokens list (checked by hand on 4.57.3)."""
    _, hf, ours = exported
    config = json.loads((hf / "config.json").read_text())
    rope = ours.config.rope_parameters
    assert config["rope_parameters"] == rope
    assert config["rope_theta"] == rope["rope_theta"]
    scaling = config["rope_scaling"]
    assert scaling["type"] == scaling["rope_type"] == "yarn"
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        assert scaling[key] == rope[key], key
    tokenizer = json.loads((hf / "tokenizer_config.json").read_text())
    assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tokenizer
    assert tokenizer["additional_special_tokens"][:3] == ["<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"]
    assert tokenizer["chat_template"] == CHAT_TEMPLATE
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == 1
