import json

import datasets
import pytest

from dsv3.data.corpus import hf_corpus, load_corpus, local_corpus, stdlib_corpus, stdlib_files

DOCS = [f"document number {i}\nwith two lines" for i in range(40)]


def texts(corpus):
    return list(corpus["train"]["text"]), list(corpus["validation"]["text"])


def test_stdlib_corpus_is_deterministic_capped_and_split_by_file():
    first = stdlib_corpus(max_bytes=300_000, validation_fraction=0.2)
    again = stdlib_corpus(max_bytes=300_000, validation_fraction=0.2)
    assert texts(first) == texts(again)
    train, validation = texts(first)
    assert train and validation and not set(train) & set(validation)
    assert sum(len(t.encode()) for t in train + validation) <= 300_000
    assert first["train"]._fingerprint == again["train"]._fingerprint


def test_stdlib_files_exclude_site_packages_and_tests():
    relative = [name for name, _ in stdlib_files(include_tests=False)]
    assert relative == sorted(relative) and "os.py" in relative
    assert not any(
        part in ("site-packages", "test", "tests") for name in relative for part in name.split("/")
    )
    assert len(stdlib_files(include_tests=True)) > len(relative)


def test_a_bigger_cap_keeps_the_same_split_for_the_same_files():
    small_train, small_validation = texts(stdlib_corpus(max_bytes=200_000, validation_fraction=0.2))
    big_train, big_validation = texts(stdlib_corpus(max_bytes=400_000, validation_fraction=0.2))
    assert set(small_train) <= set(big_train) and set(small_validation) <= set(big_validation)


@pytest.fixture
def local_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    for i, doc in enumerate(DOCS[:10]):
        (folder / f"doc{i}.txt").write_text(doc)
    (folder / "nested" / "more.jsonl").write_text(
        "".join(json.dumps({"text": d, "id": 1}) + "\n" for d in DOCS[10:30])
    )
    datasets.Dataset.from_dict({"text": DOCS[30:] + [""]}).to_parquet(str(folder / "rest.parquet"))
    (folder / "ignored.csv").write_text("text\nnot read\n")
    return folder


def test_local_corpus_reads_txt_jsonl_and_parquet(local_files, tmp_path):
    corpus = local_corpus(local_files, validation_fraction=0.25, cache_dir=str(tmp_path / "hf"))
    train, validation = texts(corpus)
    assert sorted(train + validation) == sorted(DOCS)  # one document per .txt file, empty texts dropped
    assert validation and not set(train) & set(validation)
    single = local_corpus(
        [local_files / "doc3.txt", local_files / "doc4.txt"], 0.0, cache_dir=str(tmp_path / "hf")
    )
    assert sorted(single["train"]["text"]) == DOCS[3:5] and len(single["validation"]) == 0


def test_split_by_document_hash_is_stable_across_sources(local_files, tmp_path):
    from_files = local_corpus(local_files, validation_fraction=0.25, cache_dir=str(tmp_path / "hf"))
    from_hub_path = hf_corpus(
        str(local_files / "nested"), validation_fraction=0.25, cache_dir=str(tmp_path / "hf")
    )
    assert set(from_hub_path["validation"]["text"]) <= set(from_files["validation"]["text"])


def test_hf_corpus_streams_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS))
    corpus = hf_corpus(
        str(folder), 0.2, text_field="content", max_documents=25, cache_dir=str(tmp_path / "hf")
    )
    train, validation = texts(corpus)
    assert sorted(train + validation) == sorted(DOCS[:25])
    with pytest.raises(ValueError, match="no field 'text'"):
        hf_corpus(str(folder), validation_fraction=0.2, cache_dir=str(tmp_path / "hf"))


def test_hf_corpus_reads_a_saved_dataset(tmp_path):
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": DOCS})).save_to_disk(
        str(tmp_path / "saved")
    )
    corpus = hf_corpus(str(tmp_path / "saved"), validation_fraction=0.2, max_documents=10, streaming=False)
    assert sorted(texts(corpus)[0] + texts(corpus)[1]) == sorted(DOCS[:10])
    with pytest.raises(ValueError, match="has splits \\['train'\\], not 'test'"):
        hf_corpus(str(tmp_path / "saved"), validation_fraction=0.2, split="test")


def test_load_corpus_dispatches_and_explains_mistakes(tmp_path, local_files):
    corpus = load_corpus(
        "local", paths=str(local_files), validation_fraction=0.1, cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(corpus, datasets.DatasetDict) and set(corpus) == {"train", "validation"}
    assert corpus["train"].column_names == ["text"]
    cases = [
        ({"kind": "wiki"}, "unknown corpus kind 'wiki'; use one of stdlib, local, hf"),
        ({"kind": "stdlib", "max_bytes": 10, "validation_fraction": 0.1, "size": 3}, "its arguments are"),
        ({"kind": "local", "paths": str(tmp_path / "missing"), "validation_fraction": 0.1}, "does not exist"),
        (
            {"kind": "local", "paths": str(local_files / "ignored.csv"), "validation_fraction": 0.1},
            "unsupported",
        ),
        ({"kind": "hf", "name": "./no/such/folder", "validation_fraction": 0.1}, "does not exist"),
        ({"kind": "stdlib", "max_bytes": 10, "validation_fraction": 0.1}, "no training documents"),
        ({"kind": "stdlib", "max_bytes": 10_000, "validation_fraction": 1.0}, "validation_fraction=1.0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", "\\(")):
            load_corpus(**kwargs)
