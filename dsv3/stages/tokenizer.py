"""Tokenizer stage: byte-level BPE trained on the training split (docs/paper.md, "Model": vocab).

With a `data.mixture`, it trains on every source in its mean share of the run (dsv3.data.mixture.tokenizer_texts).
Output: `tokenizer/` — tokenizer.json plus a transformers fast-tokenizer directory with the chat template,
which `AutoTokenizer.from_pretrained` and TRL load. Metrics: bytes per token and vocabulary usage on the
validation split (text the tokenizer never saw).
"""

from __future__ import annotations

import time
from pathlib import Path

from dsv3.config import Recipe
from dsv3.data.chat import CHAT_TEMPLATE
from dsv3.data.corpus import capped_texts, corpus_source, recipe_corpus, recipe_data_files
from dsv3.data.mixture import tokenizer_texts
from dsv3.data.tokenizer import bytes_per_token, save_tokenizer, train_tokenizer, vocab_usage
from dsv3.store import Stage, StageData, StageResult, metric

OUTPUT = "tokenizer"


def data_files(recipe: Recipe) -> list[str]:
    """Local corpus files (their content is part of the stage's key)."""
    return recipe_data_files(recipe.data)


def run(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    corpus = recipe_corpus(recipe.data)
    if recipe.data.mixture:
        budget = recipe.tokenizer.max_training_bytes or sum(len(t.encode("utf-8")) for t in corpus["train"]["text"])
        texts = tokenizer_texts(recipe.data.mixture, corpus["train"], recipe.seed, budget)
    else:
        texts = capped_texts(corpus["train"], recipe.tokenizer.max_training_bytes)
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, recipe.tokenizer.vocab_size, recipe.tokenizer.min_frequency)
    train_seconds = time.perf_counter() - started
    save_tokenizer(tokenizer, workdir / OUTPUT, CHAT_TEMPLATE)

    validation = list(corpus["validation"]["text"])
    metrics = {
        "bytes_per_token_validation": bytes_per_token(tokenizer, validation),
        "bytes_per_token_train": bytes_per_token(tokenizer, texts[:200]),
        "vocab_usage_validation": vocab_usage(tokenizer, validation),
        "vocab_size": tokenizer.get_vocab_size(),
        "train_seconds": train_seconds,
        "train_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "train_documents": len(texts),
        "validation_documents": len(validation),
    }
    summary = (
        f"Byte-level BPE with {metrics['vocab_size']} tokens trained on {len(texts)} documents "
        f"({metrics['train_bytes'] / 1e6:.1f} MB) in {train_seconds:.1f}s: "
        f"{metrics['bytes_per_token_validation']:.2f} bytes/token on held-out text."
    )
    data = {"corpus": StageData(corpus["train"], corpus_source(recipe.data))}
    return StageResult(outputs=[OUTPUT], metrics=metrics, summary=summary, data=data)


STAGE = Stage(
    name="tokenizer",
    run=run,
    sections=("data", "tokenizer"),
    inputs=(),
    outputs=(OUTPUT,),
    checks={"min_bytes_per_token": metric("bytes_per_token_validation")},
    headline=("bytes_per_token_validation", "vocab_usage_validation"),
    data_files=data_files,
)  # fmt: skip
