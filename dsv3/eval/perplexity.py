"""Validation perplexity by context length (YaRN, arXiv 2309.00071 §4.2): the same held-out tokens cut into rows
of each length L and scored with full causal context inside each row, so a model that uses (or is confused by)
longer context shows it as a change of perplexity with L.

Perplexity = exp(mean next-token cross-entropy over every target of every row), in nats per token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def sequence_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of rows (B, T) and the number of targets B·(T−1)."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return float(nll), targets.numel()


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean NLL per target) of rows (N, T), scored batch_size rows at a time."""
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] < 2:
        raise ValueError(
            f"perplexity needs rows (N, T) with N >= 1 and T >= 2, got shape {tuple(rows.shape)}"
        )
    was_training = model.training
    model.eval()
    nats, targets = 0.0, 0
    for first in range(0, rows.shape[0], batch_size):
        batch_nats, batch_targets = sequence_nll(model, rows[first : first + batch_size])
        nats, targets = nats + batch_nats, targets + batch_targets
    model.train(was_training)
    return math.exp(nats / targets)


def perplexity_by_length(
    model, rows_by_length: Mapping[int, torch.Tensor], batch_size: int = 8
) -> dict[int, float]:
    """{L: perplexity of the rows (N_L, L)} for each context length L."""
    for length, rows in rows_by_length.items():
        if rows.ndim != 2 or rows.shape[1] != length:
            raise ValueError(
                f"rows for length {length} have shape {tuple(rows.shape)}; expected (N, {length})"
            )
    return {length: perplexity(model, rows, batch_size) for length, rows in sorted(rows_by_length.items())}


def plot_perplexity_by_length(
    curves: Mapping[str, Mapping[int, float]], path: Path, original_length: int
) -> Path:
    """One line per model (e.g. "before", "after"): perplexity against context length, log-2 x axis."""
    from dsv3.plotting import plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, values in curves.items():
        lengths = sorted(values)
        ax.plot(lengths, [values[length] for length in lengths], "o-", label=label)
    ax.axvline(original_length, color="grey", linestyle="--", label=f"pretraining length {original_length}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity by context length")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
