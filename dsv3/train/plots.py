"""The training loop's plots as PNGs (matplotlib, headless: dsv3.plotting).

`history` is the list of records the training module logs (dsv3.train.module): {"step": s, "train/loss": ..., "val/loss": ...};
each plot draws the keys it needs from the records that have them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv3.plotting import plt


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = sorted({r["step"]: r[key] for r in history if key in r}.items())
    return [s for s, _ in points], [v for _, v in points]


def plot_losses(
    history: list[dict[str, float]],
    path: Path,
    baseline: float | None = None,
    title: str = "Pretraining loss",
    boundaries: dict[int, str] | None = None,
) -> Path:
    """Training CE, MTP CE per depth and validation loss (nats/token) against optimizer steps; `boundaries` marks
    steps where something changed ({step: label}, e.g. the start of each extension phase)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = ["train/ce"] + sorted({k for r in history for k in r if k.startswith("train/mtp_loss_depth")}) + ["val/loss"]
    for key in keys:
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, marker="o" if key == "val/loss" else None, markersize=3, label=key)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="unigram baseline (validation)")
    for step, label in (boundaries or {}).items():
        ax.axvline(step, color="black", linestyle=":", linewidth=1)
        ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    return _finish(fig, ax, path)


def plot_compared_losses(histories: dict[str, list[dict[str, float]]], path: Path, title: str) -> Path:
    """Several runs' training CE (lines) and validation loss (dashed, dots) against optimizer steps in one plot,
    one colour per run ({label: history})."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, history), color in zip(histories.items(), colors, strict=False):
        for key, style in (("train/ce", {}), ("val/loss", {"linestyle": "--", "marker": "o", "markersize": 3})):
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, color=color, label=f"{label}: {key}", **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    return _finish(fig, ax, path)


def plot_expert_load(expert_load: torch.Tensor, row_labels: list[str], path: Path, title: str) -> Path:
    """Heatmap of expert_load (layers × experts) as each expert's share relative to the layer mean (1 = even)."""
    load = expert_load.double()
    relative = (load / load.mean(dim=1, keepdim=True).clamp(min=1e-12)).numpy()
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * load.shape[1] + 2), 0.5 * load.shape[0] + 2))
    image = ax.imshow(relative, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("routed expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="load / mean load")
    return _save(fig, path)


def plot_max_violation(history: list[dict[str, float]], path: Path) -> Path:
    """Batch MaxVio per logged step and global MaxVio on the validation set, against optimizer steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/maxvio_batch", "-"), ("val/maxvio_global", "o-")):
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, style, markersize=3, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MaxVio")
    ax.set_title("Expert-load imbalance (MaxVio)")
    return _finish(fig, ax, path)


def _finish(fig, ax, path: Path) -> Path:
    """Grid and legend on a line plot, then _save."""
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
