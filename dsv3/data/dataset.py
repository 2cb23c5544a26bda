"""Tokenized, FIM-augmented, packed language-modelling data, cached as Arrow (paper §4.1-4.2).

`build_lm_dataset` turns a dataset of texts into rows of `input_ids` and `position_ids` (dsv3.data.packing):
per document, FIM (dsv3.data.fim) at `fim_rate`, then token-boundary randomisation
(dsv3.data.tokenizer.split_merged_punctuation) at `split_rate`, each from a `random.Random` seeded by
(seed, document index), so the result does not depend on batching. The result is saved under
`cache_dir/lm-<key>/` (`save_to_disk`), key = hash of (tokenizer.json, seq_len, fim_rate, split_rate, seed,
corpus text); a second call with the same key loads it without tokenizing again.
"""

import hashlib
import json
import random
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer

from dsv3.data.fim import join_psm, psm_parts
from dsv3.data.packing import pack_documents
from dsv3.data.tokenizer import (
    EOS,
    encode_batch,
    merged_punctuation_table,
    split_merged_punctuation,
    tokenizer_hash,
)
from dsv3.io import atomic_dir

STATS_FILE = "stats.json"


def corpus_hash(texts: datasets.Dataset, text_field: str = "text") -> str:
    """SHA-256 of the documents' text, in order (length-prefixed so document boundaries count)."""
    digest = hashlib.sha256()
    for batch in texts.select_columns([text_field]).iter(batch_size=1000):
        for text in batch[text_field]:
            raw = text.encode("utf-8")
            digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


def lm_cache_key(
    tokenizer: Tokenizer, seq_len: int, fim_rate: float, split_rate: float, seed: int, corpus: str
) -> str:
    fields = {
        "tokenizer": tokenizer_hash(tokenizer),
        "seq_len": seq_len,
        "fim_rate": fim_rate,
        "split_rate": split_rate,
        "seed": seed,
        "corpus": corpus,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def tokenize_documents(
    batch: dict,
    indices: list[int],
    tokenizer: Tokenizer,
    split_table: dict[int, list[int]],
    fim_rate: float,
    split_rate: float,
    seed: int,
) -> dict:
    """`datasets.map(batched=True, with_indices=True)` function: texts -> {"ids": token ids per document}.

    All parts of the batch are encoded in one `encode_batch` call (multi-threaded in tokenizers)."""
    rngs = [random.Random(f"{seed}:{index}") for index in indices]
    parts = [psm_parts(text, fim_rate, rng) for text, rng in zip(batch["text"], rngs, strict=True)]
    encoded = iter(encode_batch(tokenizer, [part for doc in parts for part in doc]))
    ids = []
    for doc, rng in zip(parts, rngs, strict=True):
        doc_ids = join_psm([next(encoded) for _ in doc], tokenizer)
        ids.append(
            np.asarray(split_merged_punctuation(doc_ids, split_table, split_rate, rng), dtype=np.int32)
        )
    return {"ids": ids}


def build_lm_dataset(
    texts_dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    seq_len: int,
    fim_rate: float,
    split_rate: float,
    seed: int,
    cache_dir: str | Path,
) -> datasets.Dataset:
    """Rows of `seq_len` tokens with columns input_ids and position_ids (int32), cached under cache_dir."""
    if "text" not in texts_dataset.column_names:
        raise ValueError(f"the texts dataset needs a 'text' column, it has {texts_dataset.column_names}")
    key = lm_cache_key(tokenizer, seq_len, fim_rate, split_rate, seed, corpus_hash(texts_dataset))
    path = Path(cache_dir) / f"lm-{key}"
    if (path / STATS_FILE).is_file():
        return datasets.load_from_disk(str(path))

    tokenized = texts_dataset.map(
        tokenize_documents,
        batched=True,
        with_indices=True,
        remove_columns=texts_dataset.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "split_table": merged_punctuation_table(tokenizer),
            "fim_rate": fim_rate,
            "split_rate": split_rate,
            "seed": seed,
        },
        keep_in_memory=True,
        new_fingerprint=f"lm-tokens-{key}",
        desc="tokenizing",
    )
    packed = pack_documents(tokenized["ids"], seq_len, tokenizer.token_to_id(EOS))
    rows = datasets.Dataset.from_dict(
        {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]},
        features=datasets.Features(
            input_ids=datasets.List(datasets.Value("int32"), length=seq_len),
            position_ids=datasets.List(datasets.Value("int32"), length=seq_len),
        ),
    )
    stats = {
        "documents": len(texts_dataset),
        "rows": len(rows),
        "tokens": len(rows) * seq_len,
        "dropped_tokens": packed["dropped_tokens"],
        "key": key,
    }
    with atomic_dir(path) as partial:  # a crash never leaves a half-written cache that looks complete
        rows.save_to_disk(str(partial))
        (partial / STATS_FILE).write_text(json.dumps(stats, indent=2))
    return datasets.load_from_disk(str(path))


def lm_dataset_stats(dataset: datasets.Dataset) -> dict:
    """The packing statistics saved next to a dataset made by `build_lm_dataset` (documents, rows, tokens,
    dropped_tokens, key)."""
    folder = Path(dataset.cache_files[0]["filename"]).parent
    return json.loads((folder / STATS_FILE).read_text())
