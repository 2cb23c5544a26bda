import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.data.fim import apply_fim, fim_split, undo_fim
from dsv3.data.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, decode, encode, train_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n\n", "print('hello, world')\n", "数学 😀 text.\n"] * 30
document = st.text(st.characters(codec="utf-8"), max_size=120)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 320)


def sentinels(tok):
    return [tok.token_to_id(t) for t in (FIM_BEGIN, FIM_HOLE, FIM_END)]


@settings(max_examples=50, deadline=None)
@given(text=document, seed=st.integers(0, 2**32))
def test_fim_split_partitions_the_text(text, seed):
    prefix, middle, suffix = fim_split(text, random.Random(seed))
    assert prefix + middle + suffix == text


@settings(max_examples=100, deadline=None)
@given(text=document, seed=st.integers(0, 2**32))
def test_fim_document_decodes_back_to_the_original(tok, text, seed):
    ids = apply_fim(text, tok, 1.0, random.Random(seed))
    begin, hole, end = sentinels(tok)
    assert (
        ids[0] == begin and ids.count(hole) == 1 and ids.count(end) == 1 and ids.index(hole) < ids.index(end)
    )
    assert decode(tok, undo_fim(ids, tok)) == text


@settings(max_examples=50, deadline=None)
@given(before=document, after=document, seed=st.integers(0, 2**32))
def test_documents_containing_sentinel_text_still_undo_exactly(tok, before, after, seed):
    text = before + FIM_HOLE + FIM_BEGIN + after + FIM_END
    assert decode(tok, undo_fim(apply_fim(text, tok, 1.0, random.Random(seed)), tok)) == text


def test_psm_layout(tok):
    text = "0123456789"
    ids = apply_fim(text, tok, 1.0, random.Random(3))
    prefix, middle, suffix = fim_split(text, rng_after_the_coin_flip(3))
    assert decode(tok, ids) == FIM_BEGIN + prefix + FIM_HOLE + suffix + FIM_END + middle


def rng_after_the_coin_flip(seed):
    """An rng in the state apply_fim had after drawing the apply/skip decision."""
    rng = random.Random(seed)
    rng.random()
    return rng


def test_rate_zero_is_plain_encoding_and_rate_is_per_document(tok):
    assert apply_fim(TEXTS[0], tok, 0.0, random.Random(0)) == encode(tok, TEXTS[0])
    begin = tok.token_to_id(FIM_BEGIN)
    rng = random.Random(0)
    transformed = sum(apply_fim("abc def", tok, 0.1, rng)[0] == begin for _ in range(4000))
    assert 0.085 < transformed / 4000 < 0.115


def test_seeded_rng_gives_the_same_result(tok):
    assert apply_fim(TEXTS[0], tok, 0.5, random.Random(7)) == apply_fim(TEXTS[0], tok, 0.5, random.Random(7))


def test_undo_leaves_plain_documents_and_rejects_broken_ones(tok):
    ids = encode(tok, TEXTS[1])
    assert undo_fim(ids, tok) == ids
    with pytest.raises(ValueError, match="malformed FIM document"):
        undo_fim([tok.token_to_id(FIM_BEGIN), *ids], tok)
    with pytest.raises(ValueError, match="FIM rate"):
        apply_fim("x", tok, 1.5, random.Random(0))
