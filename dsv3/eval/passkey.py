"""Passkey retrieval (YaRN, arXiv 2309.00071 §4.3; Mohtashami & Jaggi 2023): a random key of digits hidden at a
given depth in filler text, asked for at the end of the prompt; the model must produce it greedily.

A prompt of exactly `length` tokens is built at the token level:

    filler[:n_before]  NEEDLE(key)  filler[n_before:budget]  QUESTION

with n_before = round(depth · budget), budget = length − |needle| − |question|. The answer is `key`'s digits
(the tokenizer keeps every digit its own token). Scoring is exact match of the greedy continuation's first
`digits` characters.

Held out by construction: evaluation keys and training keys come from disjoint halves of the key space (split by
a hash of the key, `key_split`), and the filler is a token stream of different documents (the evaluation uses
the corpus' validation split, the training mix its training split). The filler window is redrawn until it does
not contain the key, so the key occurs exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsv3.data.passkeys import NEEDLE, QUESTION, SPLITS, draw_key, key_split  # noqa: F401 - the task's text and keys


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: input_ids (length,) ending with the question, the key, the depth asked for and where the needle
    starts (token index); answer_ids are the key's tokens (appended in training documents)."""

    input_ids: list[int]
    key: str
    depth: float
    needle_start: int
    answer_ids: list[int]


class PasskeyTask:
    """Passkey prompts over one filler token stream with keys from one half of the key space.

    tokenizer: a `tokenizers.Tokenizer` (the data tokenizer); filler_texts: the documents whose concatenated
    tokens are the filler; split: "train" or "heldout" keys; digits: key length; seed: fixes every draw.
    """

    def __init__(self, tokenizer, filler_texts: Sequence[str], split: str, digits: int, seed: int):
        if split not in SPLITS:
            raise ValueError(f"passkey split {split!r} is unknown; use one of {', '.join(SPLITS)}")
        self.tokenizer, self.split, self.digits, self.seed = tokenizer, split, digits, seed
        encoded = tokenizer.encode_batch([text + "\n" for text in filler_texts])
        self.filler = (
            np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encoded]) if encoded else np.zeros(0)
        )
        self.question_ids = tokenizer.encode(QUESTION).ids
        self.digit_ids = [tokenizer.token_to_id(d) for d in "0123456789"]
        if None in self.digit_ids or any(
            tokenizer.encode(d).ids != [i] for d, i in zip("0123456789", self.digit_ids, strict=True)
        ):
            raise ValueError("the passkey task needs a tokenizer that keeps every digit its own token")

    def needle_ids(self, key: str) -> list[int]:
        return self.tokenizer.encode(NEEDLE.format(key=key)).ids

    def answer_ids(self, key: str) -> list[int]:
        return [self.digit_ids[int(c)] for c in key]

    def prompt(self, length: int, depth: float, index: int, answer_tokens: int = 0) -> PasskeyPrompt:
        """The `index`-th prompt of `length` tokens (answer_tokens fewer, to leave room for the answer) with its
        needle at `depth` ∈ [0, 1] of the filler; the same (seed, split, length, depth, index) gives the same one."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth {depth} must lie in [0, 1]")
        rng = random.Random(f"{self.seed}:{self.split}:{length}:{depth}:{index}")
        key = draw_key(rng, self.digits, self.split)
        needle = self.needle_ids(key)
        budget = length - answer_tokens - len(needle) - len(self.question_ids)
        if budget < 0:
            raise ValueError(
                f"passkey length {length} is too short for the needle and question: use at least {length - budget}"
            )
        if len(self.filler) < budget:
            raise ValueError(
                f"the passkey filler has {len(self.filler)} tokens, fewer than the {budget} needed: use more filler text"
            )
        key_ids = np.asarray(self.answer_ids(key))
        for _ in range(100):
            start = rng.randrange(len(self.filler) - budget + 1)
            window = self.filler[start : start + budget]
            if not _contains(window, key_ids):
                break
        else:
            raise ValueError(
                f"no filler window of {budget} tokens without the key {key}: use other filler text"
            )
        before = round(depth * budget)
        ids = [*window[:before].tolist(), *needle, *window[before:].tolist(), *self.question_ids]
        return PasskeyPrompt(ids, key, depth, before, self.answer_ids(key))

    def document(self, length: int, rng: random.Random, eos_id: int) -> list[int]:
        """A training document of exactly `length` tokens: a prompt with its needle at a random depth, the answer
        and EOS (so packed rows need no padding)."""
        prompt = self.prompt(
            length, round(rng.random(), 4), rng.randrange(2**31), answer_tokens=self.digits + 1
        )
        return prompt.input_ids + prompt.answer_ids + [eos_id]


def _contains(stream: np.ndarray, pattern: np.ndarray) -> bool:
    """True if `pattern` occurs as a contiguous run of `stream`."""
    if len(stream) < len(pattern):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(pattern))
    return bool((windows == pattern).all(axis=1).any())


@torch.no_grad()
def greedy_answers(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (B, T) -> (B, new_tokens), using the model's KV cache."""
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    generated = [out.logits[:, -1].argmax(-1)]
    T = prompts.shape[1]
    for step in range(1, new_tokens):
        position = torch.full((prompts.shape[0], 1), T + step - 1, dtype=torch.long)
        out = model(
            input_ids=generated[-1][:, None],
            cache=out.cache,
            position_ids=position,
            use_cache=True,
        )
        generated.append(out.logits[:, -1].argmax(-1))
    return torch.stack(generated, dim=1)


@torch.no_grad()
def evaluate_passkey(
    model,
    task: PasskeyTask,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    batch_size: int = 8,
) -> dict[tuple[int, float], float]:
    """Exact-match accuracy of greedy retrieval per (length, depth), over `trials` prompts each."""
    was_training = model.training
    model.eval()
    accuracy = {}
    for length in lengths:
        for depth in depths:
            prompts = [task.prompt(length, depth, i) for i in range(trials)]
            correct = 0
            for first in range(0, trials, batch_size):
                chunk = prompts[first : first + batch_size]
                ids = torch.tensor([p.input_ids for p in chunk], dtype=torch.long)
                answers = greedy_answers(model, ids, task.digits)
                correct += sum(a.tolist() == p.answer_ids for a, p in zip(answers, chunk, strict=True))
            accuracy[(length, depth)] = correct / trials
    model.train(was_training)
    return accuracy


def plot_passkey_heatmap(accuracy: dict[tuple[int, float], float], path: Path, title: str) -> Path:
    """Accuracy per (depth row, length column) as an annotated heatmap PNG."""
    from dsv3.plotting import plt

    lengths = sorted({length for length, _ in accuracy})
    depths = sorted({depth for _, depth in accuracy})
    grid = np.array([[accuracy[(length, depth)] for length in lengths] for depth in depths])
    fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
