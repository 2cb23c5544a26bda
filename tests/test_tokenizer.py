import random
import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.data.chat import CHAT_TEMPLATE
from dsv3.data.tokenizer import (
    EOS,
    SPECIAL_TOKENS,
    bytes_per_token,
    decode,
    encode,
    load_tokenizer,
    merged_punctuation_table,
    save_tokenizer,
    split_merged_punctuation,
    tokenizer_hash,
    train_tokenizer,
    vocab_usage,
)

VOCAB = 400
# Code, prose, CJK and emoji: small enough to train in a fraction of a second.
STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = [(STDLIB / name).read_text() for name in ("argparse.py", "textwrap.py", "shlex.py")] + [
    "Hello, world.\nThis is a test: of tokens.\n\n" * 20,
    "数学很有趣。\n我们学习分词器！\n" * 20,
    "emoji 😀🎉 mixed with text.\n" * 20,
]
unicode_text = st.text(st.characters(codec="utf-8"), max_size=200)  # any code point but lone surrogates


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, VOCAB)


def test_vocab_size_and_special_tokens_come_first(tok):
    assert tok.get_vocab_size() == VOCAB
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_digits_are_split_individually(tok):
    assert [decode(tok, [i]) for i in encode(tok, "x = 12345")][-5:] == list("12345")


def test_punctuation_merges_with_line_breaks(tok):
    table = merged_punctuation_table(tok)
    merged = {decode(tok, [i]) for i in table}
    assert {":\n", ")\n", ",\n"} <= merged
    assert ":\n" in [decode(tok, [i]) for i in encode(tok, "if x:\n    pass\n")]
    for token_id, pieces in table.items():
        assert len(pieces) > 1 and decode(tok, pieces) == decode(tok, [token_id])


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], 100)


@settings(max_examples=100, deadline=None)
@given(text=unicode_text)
def test_any_unicode_round_trips(tok, text):
    assert decode(tok, encode(tok, text)) == text


@settings(max_examples=50, deadline=None)
@given(
    text=st.text(
        st.sampled_from(["中", "文", "😀", "🎉", "\x00", "\x07", "\x1b", "\u200d", "\r", "\t", "é", "a"])
    )
)
def test_cjk_emoji_and_control_characters_round_trip(tok, text):
    assert decode(tok, encode(tok, text)) == text


@settings(max_examples=50, deadline=None)
@given(before=unicode_text, special=st.sampled_from(SPECIAL_TOKENS), after=unicode_text)
def test_special_token_strings_in_documents_stay_plain_text(tok, before, special, after):
    ids = encode(tok, before + special + after)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert decode(tok, ids) == before + special + after


@settings(max_examples=50, deadline=None)
@given(text=unicode_text, where=st.integers(0, 200), surrogate=st.integers(0xD800, 0xDFFF))
def test_lone_surrogates_are_rejected_cleanly(tok, text, where, surrogate):
    bad = text[:where] + chr(surrogate) + text[where:]
    with pytest.raises(ValueError, match=f"lone surrogate U\\+{surrogate:04X}"):
        encode(tok, bad)


def test_training_on_a_lone_surrogate_is_rejected():
    with pytest.raises(ValueError, match="lone surrogate"):
        train_tokenizer(["fine", "bad \udc80 text"], VOCAB)


@settings(max_examples=50, deadline=None)
@given(rate=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_split_merged_punctuation_keeps_the_text(tok, rate, seed):
    ids = encode(tok, TEXTS[1])
    split = split_merged_punctuation(ids, tok, rate, random.Random(seed))
    assert decode(tok, split) == TEXTS[1]
    assert len(split) >= len(ids)


def test_split_rate_zero_and_one(tok):
    table = merged_punctuation_table(tok)
    ids = encode(tok, TEXTS[0])
    merged = sum(i in table for i in ids)
    assert merged > 50
    assert split_merged_punctuation(ids, table, 0.0, random.Random(0)) == ids
    all_split = split_merged_punctuation(ids, table, 1.0, random.Random(0))
    assert not any(i in table for i in all_split)
    assert len(all_split) > len(ids) + merged - 1


def test_split_fraction_follows_the_rate(tok):
    table = merged_punctuation_table(tok)
    ids = encode(tok, TEXTS[0]) * 10
    merged = sum(i in table for i in ids)
    kept = sum(i in table for i in split_merged_punctuation(ids, table, 0.25, random.Random(1)))
    assert abs((merged - kept) / merged - 0.25) < 0.05


def test_metrics(tok):
    assert 1.5 < bytes_per_token(tok, TEXTS) < 8
    usage = vocab_usage(tok, TEXTS)
    assert 0.5 < usage <= 1.0
    assert vocab_usage(tok, ["a"]) == 1 / VOCAB


def test_save_and_load_round_trip(tok, tmp_path):
    save_tokenizer(tok, tmp_path, CHAT_TEMPLATE)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_hash(loaded) == tokenizer_hash(tok)
    assert encode(loaded, TEXTS[2]) == encode(tok, TEXTS[2])


def test_transformers_loads_the_saved_tokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tok, tmp_path, CHAT_TEMPLATE)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.chat_template == CHAT_TEMPLATE
    assert hf(TEXTS[2], add_special_tokens=False)["input_ids"] == encode(tok, TEXTS[2])
    assert hf(f"a{EOS}")["input_ids"][-1] == hf.eos_token_id  # the chat view maps special strings to ids
    assert hf.decode(hf(TEXTS[1])["input_ids"]) == TEXTS[1]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at"):
        load_tokenizer(tmp_path)
