"""Validation perplexity by context length (YaRN, arXiv 2309.00071 §4.2): the same held-out tokens cut into rows
of each length L and scored with full causal context inside each row, so a model that uses (or is confused by)
longer context shows it as a change of perplexity with L.

Perplexity = exp(mean next-token cross-entropy over every target of every row), in nats per token.

`window_perplexity` scores windows of held-out text (N, W) cut into rows of one length and states its noise: the
standard error of log perplexity from the spread of the N windows' own losses (each window, drawn from its own
stretch of the validation split, is one independent draw; the rows cut from one window are not). With the windows
of `W` tokens evenly spread over the split, perplexity at the pretraining length estimates the same quantity as the
training loop's validation loss (dsv3.train.module: rows of that length, the same split) — within that noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def row_nlls(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Summed next-token NLL (nats) of each row of rows (N, T): (N,) float64, each over its T−1 targets."""
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] < 2:
        raise ValueError(
            f"perplexity needs rows (N, T) with N >= 1 and T >= 2, got shape {tuple(rows.shape)}"
        )
    was_training = model.training
    model.eval()
    sums = []
    for first in range(0, rows.shape[0], batch_size):
        batch = rows[first : first + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none")  # (B, T−1)
        sums.append(nll.double().sum(1))
    model.train(was_training)
    return torch.cat(sums)


def perplexity(model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean NLL per target) of rows (N, T), scored batch_size rows at a time."""
    nats = row_nlls(model, rows, batch_size)
    return math.exp(float(nats.sum()) / (rows.shape[0] * (rows.shape[1] - 1)))


def window_perplexity(model, windows: torch.Tensor, length: int, batch_size: int = 8) -> tuple[float, float]:
    """(perplexity, standard error of its log in nats) of windows (N, W), each cut into rows of `length` (its first
    W // length · length tokens), every row scored with context from its own start only.

    The standard error is sd(the windows' mean NLLs) / √N (nan for one window): log perplexity is the mean of the
    windows' mean NLLs (every window has the same number of targets), and it is also perplexity's relative
    standard error."""
    if windows.ndim != 2 or windows.shape[1] < length or length < 2:
        raise ValueError(f"windows {tuple(windows.shape)} cannot be cut into rows of {length} tokens")
    n, per_window = windows.shape[0], windows.shape[1] // length
    rows = windows[:, : per_window * length].reshape(n * per_window, length)
    nats = row_nlls(model, rows, batch_size).view(n, per_window).sum(1) / (per_window * (length - 1))  # (N,)
    se = float(nats.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    return math.exp(float(nats.mean())), se


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
