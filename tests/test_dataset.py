import datasets
import pytest

import dsv3.data.dataset as lm_data
from dsv3.data.dataset import build_lm_dataset, lm_dataset_stats
from dsv3.data.fim import undo_fim
from dsv3.data.tokenizer import EOS, FIM_BEGIN, decode, encode, train_tokenizer

DOCS = [f"def f{i}(x):\n    return x * {i}\n\n" * (1 + i % 4) + "# 数学 😀 <|eos|>\n" for i in range(60)]
SEQ_LEN = 32


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, 320)


@pytest.fixture(scope="module")
def texts():
    return datasets.Dataset.from_dict({"text": DOCS})


def documents(rows, tok):
    """Split the packed stream back into documents at EOS (the last, cut one is dropped)."""
    stream = [t for row in rows["input_ids"] for t in row]
    eos = tok.token_to_id(EOS)
    docs, current = [], []
    for t in stream:
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


def test_plain_packing_is_the_encoded_documents(tok, texts, tmp_path):
    rows = build_lm_dataset(texts, tok, SEQ_LEN, fim_rate=0.0, split_rate=0.0, seed=0, cache_dir=tmp_path)
    assert rows.column_names == ["input_ids", "position_ids"]
    assert all(len(r) == SEQ_LEN for r in rows["input_ids"])
    docs = documents(rows, tok)
    assert docs == [encode(tok, t) for t in DOCS[: len(docs)]]
    stats = lm_dataset_stats(rows)
    assert stats["tokens"] + stats["dropped_tokens"] == sum(len(encode(tok, t)) + 1 for t in DOCS)


def test_fim_and_split_documents_decode_back_to_the_corpus(tok, texts, tmp_path):
    rows = build_lm_dataset(texts, tok, SEQ_LEN, fim_rate=0.5, split_rate=0.5, seed=1, cache_dir=tmp_path)
    docs = documents(rows, tok)
    assert [decode(tok, undo_fim(d, tok)) for d in docs] == DOCS[: len(docs)]
    transformed = sum(d[0] == tok.token_to_id(FIM_BEGIN) for d in docs)
    assert 0 < transformed < len(docs)
    assert sum(map(len, docs)) > sum(len(encode(tok, t)) for t in DOCS[: len(docs)])  # some tokens were split


def test_same_seed_same_rows_and_the_cache_is_reused(tok, texts, tmp_path, monkeypatch):
    first = build_lm_dataset(texts, tok, SEQ_LEN, 0.5, 0.5, seed=2, cache_dir=tmp_path / "a")
    fresh = build_lm_dataset(texts, tok, SEQ_LEN, 0.5, 0.5, seed=2, cache_dir=tmp_path / "b")
    assert first["input_ids"] == fresh["input_ids"] and first["position_ids"] == fresh["position_ids"]
    other = build_lm_dataset(texts, tok, SEQ_LEN, 0.5, 0.5, seed=3, cache_dir=tmp_path / "a")
    assert other["input_ids"] != first["input_ids"]
    assert len(list((tmp_path / "a").iterdir())) == 2

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("the cached dataset should have been loaded")

    monkeypatch.setattr(lm_data, "tokenize_documents", must_not_tokenize)
    cached = build_lm_dataset(texts, tok, SEQ_LEN, 0.5, 0.5, seed=2, cache_dir=tmp_path / "a")
    assert cached["input_ids"] == first["input_ids"]
    with pytest.raises(AssertionError, match="should have been loaded"):  # any change of corpus is a new key
        build_lm_dataset(texts.select(range(59)), tok, SEQ_LEN, 0.5, 0.5, seed=2, cache_dir=tmp_path / "a")


def test_missing_text_column(tok, tmp_path):
    with pytest.raises(ValueError, match="needs a 'text' column"):
        build_lm_dataset(datasets.Dataset.from_dict({"body": ["x"]}), tok, 8, 0.1, 0.1, 0, tmp_path)
