import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.data.chat import CHAT_TEMPLATE, conversation, format_conversation
from dsv3.data.tokenizer import EOS, save_tokenizer, train_tokenizer

TEXTS = ["What is 2 + 3? The answer is \\boxed{5}.\n", "Be brief.\nSolve for x: 3x + 1 = 7.\n"] * 30
content = st.text(st.characters(codec="utf-8", exclude_characters="<|>"), max_size=40)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(TEXTS, 320), out, CHAT_TEMPLATE)
    return AutoTokenizer.from_pretrained(out)


def masked_text(tok, messages):
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m])


def test_layout():
    messages = conversation("What is 2 + 3?", "\\boxed{5}", system="Be brief.")
    assert (
        format_conversation(messages)
        == "<|bos|><|system|>Be brief.<|user|>What is 2 + 3?<|assistant|>\\boxed{5}<|eos|>"
    )
    assert format_conversation(messages[:2], add_generation_prompt=True).endswith(
        "<|user|>What is 2 + 3?<|assistant|>"
    )


@settings(max_examples=30, deadline=None)
@given(turns=st.lists(st.tuples(content, content), min_size=1, max_size=3), system=st.none() | content)
def test_template_matches_python_rendering_and_masks_only_assistant_turns(hf_tokenizer, turns, system):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in turns:
        messages += conversation(question, answer)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == format_conversation(messages)
    assert masked_text(hf_tokenizer, messages) == "".join(answer + EOS for _, answer in turns)


def test_generation_prompt_is_a_prefix_of_the_full_conversation(hf_tokenizer):
    prompt = conversation("Solve for x: 3x + 1 = 7.")
    full = conversation("Solve for x: 3x + 1 = 7.", "x = 2, so \\boxed{2}.")
    prompt_ids = hf_tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    full_ids = hf_tokenizer.apply_chat_template(full, tokenize=True, return_dict=True)
    assert full_ids["input_ids"][: len(prompt_ids["input_ids"])] == prompt_ids["input_ids"]
    assert full_ids["input_ids"][-1] == hf_tokenizer.eos_token_id


def test_trl_accepts_the_template_for_assistant_only_loss(hf_tokenizer):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    assert has_generation_markers(hf_tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(hf_tokenizer)


def test_bad_roles_are_rejected(hf_tokenizer):
    with pytest.raises(ValueError, match="role 'tool'"):
        format_conversation([{"role": "tool", "content": "x"}])
    with pytest.raises(Exception, match="unknown chat role tool"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match="at least one message"):
        format_conversation([])
