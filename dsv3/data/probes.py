"""Synthetic rows for the copy/retrieval probe (recipes/probes/copy.yaml): the two skills passkey retrieval is made
of, on a small vocabulary where a 2-layer model learns them in minutes.

Token ids (`ProbeVocab`): 0 a padding id never drawn, 1 the pair marker K, 2 the query marker Q, then three disjoint
alphabets — key symbols, value symbols, filler symbols. Two kinds of rows, each exactly `length` tokens:

- copy rows (in-context copying, Olsson et al. 2022): random symbols with one random segment x written twice,
  `… x … x …`, at random places and of random length, so only looking back at the token's earlier occurrence and
  copying what followed predicts the second x (a fixed look-back distance does not);
- key-value rows (passkey-style retrieval): filler with `pairs` stored pairs `K k1 k2 v1 v2 v3` at random places, then
  the queries `Q k1 k2 v1 v2 v3` for some of them at the end. A key is `key_tokens` key symbols, a value
  `value_tokens` random value symbols drawn afresh per row, so a value can only come from the row itself. No symbol
  occurs in two keys or two values of one row (nor in the filler, a third alphabet): each token of a query and of
  its answer occurs exactly once before, so one look-back per token (an induction head) retrieves the answer.

Held out by construction: a key belongs to the "train" or the "heldout" half of the key space by a hash of its
symbols (`key_split`); training rows use train keys only, evaluation rows held-out keys only. The same seed gives the
same rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from dsv3.data.corpus import hash_fraction

SPLITS = ("train", "heldout")
PAD, KEY_MARK, QUERY_MARK = 0, 1, 2


@dataclass(frozen=True)
class ProbeVocab:
    """Sizes of the three alphabets; ids: 0 PAD, 1 K, 2 Q, then keys, values, filler in that order."""

    key_symbols: int = 16
    value_symbols: int = 16
    filler_symbols: int = 29

    def __post_init__(self):
        if min(self.key_symbols, self.value_symbols, self.filler_symbols) < 2:
            raise ValueError("every alphabet of the probe vocabulary needs at least 2 symbols")

    @property
    def keys(self) -> range:
        return range(3, 3 + self.key_symbols)

    @property
    def values(self) -> range:
        return range(self.keys.stop, self.keys.stop + self.value_symbols)

    @property
    def filler(self) -> range:
        return range(self.values.stop, self.values.stop + self.filler_symbols)

    @property
    def symbols(self) -> list[int]:
        """Every id a copy row draws from (all but PAD and the two markers)."""
        return list(range(3, self.filler.stop))

    @property
    def size(self) -> int:
        return self.filler.stop


def key_split(key: tuple[int, ...]) -> str:
    """Which half of the key space `key` (its symbol ids) is in: "heldout" or "train"."""
    return "heldout" if hash_fraction(f"probe-key:{','.join(map(str, key))}") < 0.5 else "train"


def split_keys(vocab: ProbeVocab, key_tokens: int, split: str) -> list[tuple[int, ...]]:
    """Every key of `key_tokens` key symbols in the `split` half, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"key split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    keys = [()]
    for _ in range(key_tokens):
        keys = [k + (s,) for k in keys for s in vocab.keys]
    return [k for k in keys if key_split(k) == split]


@dataclass(frozen=True)
class CopyRow:
    """A copy row: its tokens and where the two copies of its segment start, and the segment's length."""

    ids: list[int]
    first: int
    second: int
    segment: int


def copy_row(rng: random.Random, vocab: ProbeVocab, length: int, min_segment: int = 8) -> CopyRow:
    """`… x … x …`: random symbols around two copies of a random segment x (min_segment..length/2 tokens), both
    copies and the gaps placed at random."""
    if length < 2 * min_segment:
        raise ValueError(f"a copy row of {length} tokens cannot hold two segments of {min_segment}: lengthen it")
    symbols = vocab.symbols
    n = rng.randint(min_segment, length // 2)
    segment = [rng.choice(symbols) for _ in range(n)]
    free = length - 2 * n
    cuts = sorted(rng.randint(0, free) for _ in range(2))
    gaps = [cuts[0], cuts[1] - cuts[0], free - cuts[1]]
    row, starts = [], []
    for i, gap in enumerate(gaps):
        row += [rng.choice(symbols) for _ in range(gap)]
        if i < 2:
            starts.append(len(row))
            row += segment
    return CopyRow(row, starts[0], starts[1], n)


@dataclass(frozen=True)
class KeyValueRow:
    """A key-value row: its tokens, the position of each query's first answer token, each query's key and answer."""

    ids: list[int]
    answer_starts: list[int]
    keys: list[tuple[int, ...]]
    answers: list[list[int]]


def key_value_row(
    rng: random.Random,
    vocab: ProbeVocab,
    length: int,
    split: str,
    pairs: int = 4,
    queries: int = 2,
    key_tokens: int = 2,
    value_tokens: int = 3,
    keys: list[tuple[int, ...]] | None = None,
) -> KeyValueRow:
    """Filler with `pairs` stored pairs `K key value` at random places, then `Q key value` for `queries` of them (in
    random order); exactly `length` tokens. Keys come from the `split` half (`keys`: that list, precomputed) and share
    no symbol; values are random value symbols, none used twice in the row."""
    if not 1 <= queries <= pairs:
        raise ValueError(f"queries must lie in 1..pairs ({pairs}), got {queries}")
    if pairs * key_tokens > vocab.key_symbols or pairs * value_tokens > vocab.value_symbols:
        raise ValueError(
            f"{pairs} pairs need {pairs * key_tokens} distinct key symbols and {pairs * value_tokens} distinct value "
            f"symbols; the vocabulary has {vocab.key_symbols} and {vocab.value_symbols}: use fewer pairs"
        )
    pair_len = 1 + key_tokens + value_tokens
    filler = length - (pairs + queries) * pair_len
    if filler < 0:
        raise ValueError(f"a key-value row of {length} tokens cannot hold {pairs} pairs and {queries} queries: lengthen it")
    pool = keys if keys is not None else split_keys(vocab, key_tokens, split)
    chosen: list[tuple[int, ...]] = []
    used: set[int] = set()
    for key in rng.sample(pool, len(pool)):
        if len(set(key)) == len(key) and used.isdisjoint(key):
            chosen.append(key)
            used.update(key)
            if len(chosen) == pairs:
                break
    if len(chosen) < pairs:
        raise ValueError(f"the {split} keys offer fewer than {pairs} keys without a shared symbol: use fewer pairs")
    drawn = rng.sample(list(vocab.values), pairs * value_tokens)
    values = [drawn[i * value_tokens : (i + 1) * value_tokens] for i in range(pairs)]
    cuts = sorted(rng.randint(0, filler) for _ in range(pairs))
    gaps = [b - a for a, b in zip([0, *cuts], [*cuts, filler], strict=True)]
    fill = list(vocab.filler)
    ids: list[int] = []
    for i, gap in enumerate(gaps):
        ids += [rng.choice(fill) for _ in range(gap)]
        if i < pairs:
            ids += [KEY_MARK, *chosen[i], *values[i]]
    asked = rng.sample(range(pairs), queries)
    starts = []
    for i in asked:
        ids += [QUERY_MARK, *chosen[i]]
        starts.append(len(ids))
        ids += values[i]
    return KeyValueRow(ids, starts, [chosen[i] for i in asked], [values[i] for i in asked])


def probe_rows(
    vocab: ProbeVocab, rows: int, length: int, seed: int, copy_fraction: float = 0.5, min_segment_share: float = 0.375, **kv
) -> np.ndarray:
    """(rows, length) int32 training rows from train keys: a `copy_fraction` share of copy rows (segments of
    min_segment_share·length to length/2 tokens), the rest key-value rows (`kv`: pairs, queries, key_tokens,
    value_tokens), interleaved at random."""
    rng = random.Random(f"probe-rows:{seed}:{length}")
    keys = split_keys(vocab, kv.get("key_tokens", 2), "train")
    out = np.empty((rows, length), dtype=np.int32)
    for r in range(rows):
        if rng.random() < copy_fraction:
            out[r] = copy_row(rng, vocab, length, max(1, round(min_segment_share * length))).ids
        else:
            out[r] = key_value_row(rng, vocab, length, "train", keys=keys, **kv).ids
    return out


def retrieval_prompts(
    vocab: ProbeVocab, rows: int, length: int, seed: int, split: str = "heldout", **kv
) -> list[KeyValueRow]:
    """`rows` evaluation rows of `length` tokens with one query each (the answer is the row's last value_tokens
    tokens): `split` keys (held out by default), a seed of their own."""
    rng = random.Random(f"probe-eval:{seed}:{length}:{split}")
    keys = split_keys(vocab, kv.get("key_tokens", 2), split)
    kv = {k: v for k, v in kv.items() if k != "queries"}
    return [key_value_row(rng, vocab, length, split, queries=1, keys=keys, **kv) for _ in range(rows)]
