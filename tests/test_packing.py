import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.data.packing import pack_documents

EOS = 1
documents = st.lists(st.lists(st.integers(3, 1000), max_size=40), max_size=30)


def reference_positions(docs, seq_len):
    """Positions by the documented rule, computed token by token."""
    positions, since_doc = [], 0
    for doc in docs:
        for _ in range(len(doc) + 1):
            positions.append(since_doc)
            since_doc += 1
        since_doc = 0
    return [min(p, i % seq_len) for i, p in enumerate(positions)]


@settings(max_examples=100, deadline=None)
@given(docs=documents, seq_len=st.integers(1, 17))
def test_packing_loses_and_duplicates_no_token(docs, seq_len):
    packed = pack_documents(docs, seq_len, EOS)
    stream = [t for doc in docs for t in [*doc, EOS]]
    rows = packed["input_ids"]
    assert rows.shape == (len(stream) // seq_len, seq_len)
    assert rows.ravel().tolist() == stream[: rows.size]
    assert packed["dropped_tokens"] == len(stream) - rows.size < seq_len


@settings(max_examples=100, deadline=None)
@given(docs=documents, seq_len=st.integers(1, 17))
def test_positions_restart_at_document_and_row_starts(docs, seq_len):
    packed = pack_documents(docs, seq_len, EOS)
    positions = packed["position_ids"].ravel().tolist()
    assert positions == reference_positions(docs, seq_len)[: len(positions)]
    tokens = packed["input_ids"].ravel().tolist()
    for i in range(1, len(tokens)):  # a restart mid-row happens exactly after an EOS
        if i % seq_len:
            assert (positions[i] == 0) == (tokens[i - 1] == EOS)


def test_example():
    packed = pack_documents([[5, 6, 7], [8], [9, 10, 11, 12, 13]], 4, EOS)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 9, 10], [11, 12, 13, 1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3]]
    assert packed["dropped_tokens"] == 0


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len=0"):
        pack_documents([[3]], 0, EOS)
