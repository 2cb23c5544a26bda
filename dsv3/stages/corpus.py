"""The recipe's `data` section turned into a corpus (train / validation splits of documents)."""

from __future__ import annotations

from pathlib import Path

import datasets

from dsv3.config import DataSection
from dsv3.data.corpus import load_corpus


def recipe_corpus(data: DataSection) -> datasets.DatasetDict:
    """The documents the recipe names: the embedded stdlib corpus, local files, or a HF dataset."""
    if data.source == "stdlib":
        return load_corpus("stdlib", max_bytes=data.max_bytes, validation_fraction=data.validation_fraction)
    if data.source == "local":
        return load_corpus(
            "local",
            paths=data.paths,
            validation_fraction=data.validation_fraction,
            text_field=data.text_field,
        )
    return load_corpus(
        "hf",
        name=data.hf_name,
        config=data.hf_config,
        split=data.hf_split,
        text_field=data.text_field,
        validation_fraction=data.validation_fraction,
        max_documents=data.max_documents or 100_000,
    )


def capped_texts(split: datasets.Dataset, max_bytes: int | None) -> list[str]:
    """The split's texts, in order, until `max_bytes` of UTF-8 would be exceeded (None: all of them)."""
    texts, total = [], 0
    for text in split["text"]:
        size = len(text.encode("utf-8"))
        if max_bytes is not None and texts and total + size > max_bytes:
            break
        texts.append(text)
        total += size
    return texts


def recipe_data_files(data: DataSection) -> list[str]:
    """The local files and folders the data section reads (their content is part of the reading stages' keys)."""
    if data.source == "local":
        return list(data.paths)
    if data.source == "hf" and data.hf_name and Path(data.hf_name).expanduser().exists():
        return [str(Path(data.hf_name).expanduser())]
    return []
