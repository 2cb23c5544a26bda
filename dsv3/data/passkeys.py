"""Passkey text and keys (YaRN, arXiv 2309.00071 §4.3): the needle and question the evaluation (dsv3.eval.passkey)
asks, and the split of the key space into "train" keys (training documents: the extend stage's, the pretraining
mixture's retrieval source) and "heldout" keys (evaluation only), by a hash of the key.
"""

from __future__ import annotations

import random

from dsv3.data.corpus import hash_fraction

NEEDLE = "\n# The pass key is {key}. Remember it.\n"
QUESTION = "\n# What is the pass key? The pass key is "
SPLITS = ("train", "heldout")


def key_split(key: str) -> str:
    """Which half of the key space `key` is in: "heldout" (evaluation) or "train"."""
    return "heldout" if hash_fraction(f"passkey:{key}") < 0.5 else "train"


def draw_key(rng: random.Random, digits: int, split: str) -> str:
    """A uniformly random key of `digits` digits (leading zeros allowed) from the `split` half of the key space."""
    if split not in SPLITS:
        raise ValueError(f"passkey split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    while True:
        key = "".join(rng.choice("0123456789") for _ in range(digits))
        if key_split(key) == split:
            return key
