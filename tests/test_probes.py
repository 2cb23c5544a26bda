"""dsv3/data/probes.py, the copy/retrieval probe's rows: copies are exact, every query's answer is the value stored
under its key earlier in the row and retrievable by one look-back, train and held-out keys never meet, rows have the
asked length and the same seed gives the same rows."""

import random

import numpy as np
import pytest

from dsv3.data.probes import (
    KEY_MARK,
    QUERY_MARK,
    ProbeVocab,
    copy_row,
    key_split,
    key_value_row,
    probe_rows,
    retrieval_prompts,
    split_keys,
)

VOCAB = ProbeVocab()


def test_vocabulary_alphabets_are_disjoint_and_fill_the_ids():
    ids = [*VOCAB.keys, *VOCAB.values, *VOCAB.filler]
    assert len(ids) == len(set(ids)) == VOCAB.size - 3 and min(ids) == 3 and VOCAB.size == 64
    assert VOCAB.symbols == ids


@pytest.mark.parametrize("length", [32, 128, 512])
def test_copy_rows_hold_an_exact_copy(length):
    rng = random.Random(0)
    for _ in range(50):
        row = copy_row(rng, VOCAB, length)
        assert len(row.ids) == length and 8 <= row.segment <= length // 2
        assert row.first + row.segment <= row.second
        assert row.ids[row.first : row.first + row.segment] == row.ids[row.second : row.second + row.segment]
        assert set(row.ids) <= set(VOCAB.symbols)


def test_key_space_splits_in_two_disjoint_halves():
    train, heldout = split_keys(VOCAB, 2, "train"), split_keys(VOCAB, 2, "heldout")
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == VOCAB.key_symbols**2
    assert min(len(train), len(heldout)) > 100  # each half offers every last symbol many times
    assert all(key_split(k) == "heldout" for k in heldout)


def stored_pairs(ids: list[int], key_tokens: int = 2, value_tokens: int = 3) -> dict[tuple, list[int]]:
    """{key: value} of the `K key value` pairs in a row."""
    return {
        tuple(ids[i + 1 : i + 1 + key_tokens]): ids[i + 1 + key_tokens : i + 1 + key_tokens + value_tokens]
        for i, t in enumerate(ids)
        if t == KEY_MARK
    }


@pytest.mark.parametrize("split, length", [("train", 128), ("heldout", 128), ("heldout", 512)])
def test_every_query_is_answered_by_the_value_stored_under_its_key(split, length):
    rng = random.Random(1)
    for _ in range(50):
        row = key_value_row(rng, VOCAB, length, split, pairs=4, queries=2)
        assert len(row.ids) == length
        pairs = stored_pairs(row.ids)
        assert len(pairs) == 4 and all(key_split(k) == split for k in pairs)
        assert len({s for k in pairs for s in k}) == 8 and len({s for v in pairs.values() for s in v}) == 12
        for start, key, answer in zip(row.answer_starts, row.keys, row.answers, strict=True):
            assert row.ids[start - 3 : start] == [QUERY_MARK, *key] and row.ids[start : start + 3] == answer
            assert pairs[key] == answer
            stored = row.ids.index(KEY_MARK, 0)  # every symbol of the key and the answer occurs once in the pairs
            for symbol in (*key, *answer):
                assert row.ids[stored:start].count(symbol) == 1 + (symbol in key)
        filler = [t for t in row.ids if t in VOCAB.filler]
        assert len(filler) == length - 6 * 6


def test_training_rows_never_hold_a_held_out_key():
    rows = probe_rows(VOCAB, 400, 128, seed=3, pairs=4, queries=2)
    heldout = set(split_keys(VOCAB, 2, "heldout"))
    kv_rows = [r for r in rows.tolist() if KEY_MARK in r]
    assert 120 < len(kv_rows) < 280  # about half of the rows, copy_fraction 0.5
    for ids in kv_rows:
        assert not set(stored_pairs(ids)) & heldout
    prompts = retrieval_prompts(VOCAB, 50, 512, seed=3, pairs=4)
    assert all(p.keys[0] in heldout and len(p.ids) == 512 and p.answer_starts == [509] for p in prompts)


def test_copy_rows_copy_at_least_the_minimum_share():
    rows = probe_rows(VOCAB, 30, 128, seed=4, copy_fraction=1.0, min_segment_share=0.375)
    for ids in rows.tolist():  # some 48-token window occurs twice in the row
        windows = [tuple(ids[i : i + 48]) for i in range(128 - 48 + 1)]
        assert len(set(windows)) < len(windows)


def test_rows_are_fixed_by_the_seed():
    a, b = probe_rows(VOCAB, 20, 64, seed=5), probe_rows(VOCAB, 20, 64, seed=5)
    assert a.dtype == np.int32 and a.shape == (20, 64) and (a == b).all()
    assert (a != probe_rows(VOCAB, 20, 64, seed=6)).any()
    assert retrieval_prompts(VOCAB, 5, 128, 0) == retrieval_prompts(VOCAB, 5, 128, 0)


def test_impossible_rows_are_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        key_value_row(random.Random(0), VOCAB, 30, "train", pairs=4, queries=2)
    with pytest.raises(ValueError, match="use fewer pairs"):
        key_value_row(random.Random(0), VOCAB, 512, "train", pairs=6, queries=2)
    with pytest.raises(ValueError, match="two segments"):
        copy_row(random.Random(0), VOCAB, 10)
