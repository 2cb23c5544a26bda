"""A pretraining data mixture: sources with weights, optionally by training fraction (data/README.md, "The mixture").

`data.mixture` maps a source to a weight, or to {training fraction: weight} — piecewise constant, each weight
holding from its fraction until the next (e.g. `copy: {0.0: 0.6, 0.3: 0.2}`: copy-rich early, as the copy probe
found induction forms fastest on copy-dense rows). At each point of the run the weights are normalised into shares.
Sources: "corpus" (the recipe's data.source: stdlib, local files or a HF dataset) and the generated ones
(dsv3.data.generated: copy, retrieval, math).

The training order is fixed before training starts, as Megatron's blended datasets do: `blend_index` gives, for
every row position of the run, the source (the one furthest below its share so far — no randomness, so each step's
rows follow the shares as closely as whole rows can) and the row of that source (a per-source stream of seeded
per-epoch permutations). `blended_rows` returns the rows in that order; the loop reads them as given.
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer

from dsv3.data.corpus import capped_texts, hash_fraction
from dsv3.data.dataset import build_lm_dataset
from dsv3.data.generated import corpus_words, generated_document, generated_documents

CORPUS = "corpus"


def weight_at(weight: float | dict[float, float], fraction: float) -> float:
    """The weight of a source at `fraction` of the run: a constant, or the value of the last breakpoint <= fraction."""
    if not isinstance(weight, dict):
        return float(weight)
    return float(weight[max(f for f in weight if f <= fraction)])


def shares_at(mixture: dict[str, float | dict[float, float]], fraction: float) -> dict[str, float]:
    """Each source's share of the rows at `fraction` of the run (its weight over the sum of weights there)."""
    weights = {source: weight_at(w, fraction) for source, w in mixture.items()}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"data.mixture: every weight is 0 at training fraction {fraction:g}; give one source a weight there")
    return {source: w / total for source, w in weights.items()}


def mean_shares(mixture: dict[str, float | dict[float, float]]) -> dict[str, float]:
    """Each source's share of the whole run (its shares averaged over the training fraction)."""
    cuts = sorted({0.0, 1.0} | {f for w in mixture.values() if isinstance(w, dict) for f in w if f < 1.0})
    means = dict.fromkeys(mixture, 0.0)
    for start, end in zip(cuts, cuts[1:], strict=False):
        for source, share in shares_at(mixture, start).items():
            means[source] += share * (end - start)
    return means


def blend_sources(mixture: dict[str, float | dict[float, float]], total_rows: int) -> np.ndarray:
    """(total_rows,) the source index (in mixture order) of every row position: greedily the source whose count so
    far falls furthest below its share of the rows up to here (shares at each position's training fraction)."""
    names = list(mixture)
    chosen = np.empty(total_rows, dtype=np.int64)
    expected = np.zeros(len(names))
    counts = np.zeros(len(names))
    cached_fraction, shares = None, None
    for position in range(total_rows):
        fraction = position / total_rows
        key = max((f for w in mixture.values() if isinstance(w, dict) for f in w if f <= fraction), default=0.0)
        if key != cached_fraction:
            cached_fraction = key
            shares = np.array([shares_at(mixture, fraction)[n] for n in names])
        expected += shares
        source = int(np.argmax(expected - counts))
        counts[source] += 1
        chosen[position] = source
    return chosen


def stream_rows(n_rows: int, count: int, seed: int, source: str) -> np.ndarray:
    """The first `count` rows of an endless stream of per-epoch permutations of range(n_rows), seeded per source."""
    if n_rows == 0:
        raise ValueError(f"data.mixture: source {source!r} packs into no full row: give it more text or lower seq_len")
    epochs = math.ceil(count / n_rows)
    seeds = [int(hash_fraction(f"mixture:{seed}:{source}:{e}") * 2**62) for e in range(epochs)]
    order = [torch.randperm(n_rows, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.cat(order)[:count].numpy() if order else np.zeros(0, dtype=np.int64)


def rows_needed(mixture: dict[str, float | dict[float, float]], total_rows: int) -> dict[str, int]:
    """How many rows of each source a run of `total_rows` rows draws."""
    chosen = np.bincount(blend_sources(mixture, total_rows), minlength=len(mixture))
    return {source: int(n) for source, n in zip(mixture, chosen, strict=True)}


def blended_rows(
    mixture: dict[str, float | dict[float, float]], rows: dict[str, datasets.Dataset], total_rows: int, seed: int
) -> datasets.Dataset:
    """The `total_rows` rows of the run in training order: row position p comes from source blend_sources(p), the
    next row of that source's seeded stream."""
    names = list(mixture)
    sources = blend_sources(mixture, total_rows)
    offsets = np.cumsum([0] + [len(rows[n]) for n in names])
    index = np.empty(total_rows, dtype=np.int64)
    for k, name in enumerate(names):
        where = np.flatnonzero(sources == k)
        index[where] = offsets[k] + stream_rows(len(rows[name]), len(where), seed, name)
    combined = datasets.concatenate_datasets([rows[n] for n in names])
    return combined.select(index.tolist())


def generated_texts(source: str, seed: int, words: list[str], max_bytes: int) -> list[str]:
    """Documents of a generated source, in order, until `max_bytes` of UTF-8 would be exceeded (at least one)."""
    texts, total = [], 0
    while True:
        doc = generated_document(source, seed, len(texts), words)
        size = len(doc.encode("utf-8"))
        if texts and total + size > max_bytes:
            return texts
        texts.append(doc)
        total += size


def tokenizer_texts(
    mixture: dict[str, float | dict[float, float]], corpus_train: datasets.Dataset, seed: int, max_bytes: int
) -> list[str]:
    """What the tokenizer trains on: each source's mean share of `max_bytes` (the corpus' texts in order, the
    generated sources' documents), so its merges follow the mixture the model reads."""
    shares = mean_shares(mixture)
    texts = capped_texts(corpus_train, round(shares[CORPUS] * max_bytes))
    words = corpus_words(corpus_train["text"])
    for source, share in shares.items():
        if source != CORPUS and share > 0:
            texts += generated_texts(source, seed, words, round(share * max_bytes))
    return texts


def mixture_rows(
    mixture: dict[str, float | dict[float, float]],
    corpus_rows: datasets.Dataset,
    corpus_texts: list[str],
    tokenizer: Tokenizer,
    seq_len: int,
    total_rows: int,
    seed: int,
    cache_dir: Path,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """The run's `total_rows` training rows in order (`blended_rows`) and the rows each source packs into: the
    corpus' packed rows plus, per generated source, enough documents (no FIM, no token splitting) to pack into the
    rows it is drawn for, so no generated row repeats."""
    needed = rows_needed(mixture, total_rows)
    words = corpus_words(corpus_texts)
    rows = {CORPUS: corpus_rows}
    for source, count in needed.items():
        if source == CORPUS:
            continue
        sample = generated_documents(source, 64, seed, words)
        per_doc = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(sample)) / len(sample)
        documents = generated_documents(source, math.ceil(1.1 * max(count, 1) * seq_len / per_doc) + 1, seed, words)
        texts = datasets.Dataset.from_dict({"text": documents})
        rows[source] = build_lm_dataset(texts, tokenizer, seq_len, 0.0, 0.0, seed, cache_dir)
    return blended_rows(mixture, rows, total_rows, seed), {source: len(r) for source, r in rows.items()}
