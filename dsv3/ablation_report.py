"""The ablation report: paired pretraining ablations beside the papers' numbers (PAPER.md).

Each ablation is a pair of runs that differ in one recipe switch — same seed, data and tokenizer:
- FP8 blockwise vs BF16 (DeepSeek-V3 report §3.3): validation loss within 0.25% of BF16;
- loss-free balancing vs an auxiliary loss (arXiv 2408.15664, §4): global MaxVio 0.04 vs 0.72 at equal or better
  loss (perplexity 9.50 vs 9.56);
- MTP on vs off (report §2.2, §5.4.3): the main head's validation loss (MTP helped 15.7B and 228.7B MoEs, may hurt
  below ~1B) and the acceptance of the MTP-drafted token in speculative decoding (85–90%).

This module sees a run only as an `ArmRun` (the pretrain stage's metrics and per-step history, the acceptance
rate); the flow (flows/ablations.py) reads those from the stage folders. It writes the comparison as markdown —
a table of claims (paper beside ours) and a table of arms, "missing" where a pair has not run, never a zero — and
the paired curves (validation and training loss, MaxVio against the step) as one PNG per ablation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MISSING = "missing"
NONE = "—"
FP8_GAP_BOUND = 0.0025  # report §3.3: relative loss error below 0.25%
PAPER_ACCEPTANCE = (0.85, 0.90)  # report §5.4.3


@dataclass(frozen=True)
class Ablation:
    """A pair: the `arm` recipe (the paper's technique) against the `baseline` recipe, differing in `switch`.

    `arm` and `baseline` are recipe file stems (recipes/ablations/<stem>.yaml); `name` is the MLflow tag `ablation`."""

    name: str
    title: str
    switch: str
    arm: str
    baseline: str
    also: tuple[str, ...] = ()  # settings that go with the switch (the aux-loss baseline's own α)


ABLATIONS = (
    Ablation("fp8", "FP8 blockwise vs BF16", "pretrain.precision", "fp8", "bf16"),
    Ablation(
        "balancing",
        "loss-free vs auxiliary-loss balancing",
        "pretrain.balancing",
        "loss-free",
        "aux-loss",
        also=("model.aux_loss_alpha",),
    ),
    Ablation("mtp", "MTP on vs off", "model.num_nextn_predict_layers", "mtp-on", "mtp-off"),
)
ARMS = {stem: a for a in ABLATIONS for stem in (a.arm, a.baseline)}


@dataclass
class ArmRun:
    """One finished arm: its recipe name, the switch's value, the pretrain stage's metrics (final_val_loss, ...) and
    history (records {"step", "val/loss", "train/ce", "train/maxvio_batch", "val/maxvio_global", ...}), the MTP
    acceptance rate (None: no MTP module) and the pretrain stage's MLflow run."""

    recipe: str
    switch_value: Any
    metrics: dict[str, float]
    history: list[dict[str, float]]
    acceptance: float | None = None
    mlflow_run_id: str | None = None

    @property
    def val_loss(self) -> float:
        return self.metrics["final_val_loss"]

    @property
    def maxvio(self) -> float:
        return self.metrics["final_val_maxvio_global"]


def relative_gap(value: float, reference: float) -> float:
    """(value − reference) / reference: the report's "relative loss error" of FP8 against BF16 (§3.3)."""
    if reference == 0 or not math.isfinite(reference):
        raise ValueError(f"relative gap: the reference must be finite and non-zero, got {reference}")
    return (value - reference) / reference


def recipe_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value in a, value in b)} for every key where two flattened recipes differ, the name aside."""
    keys = (set(a) | set(b)) - {"name"}
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}


def check_pair(ablation: Ablation, arm: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Raise ValueError unless the two flattened recipes differ in the ablation's switch and nothing else (but the
    settings that go with it)."""
    diff = recipe_differences(arm, baseline)
    if ablation.switch not in diff or not set(diff) <= {ablation.switch, *ablation.also}:
        shown = ", ".join(f"{k}: {va!r} vs {vb!r}" for k, (va, vb) in diff.items()) or "nothing"
        raise ValueError(
            f"ablation {ablation.name}: {ablation.arm} and {ablation.baseline} must differ only in {ablation.switch} "
            f"(they differ in {shown}); edit recipes/ablations/{ablation.arm}.yaml or {ablation.baseline}.yaml"
        )


# ------------------------------------------------------------------------------------------------ claims


@dataclass(frozen=True)
class Claim:
    """One published claim: what is compared, the paper's value, and how to measure it on (arm, baseline)."""

    what: str
    paper: str
    measure: Callable[[ArmRun, ArmRun], tuple[str, bool]]  # -> (our value as text, holds as in the paper)


def _percent(fraction: float) -> str:
    return f"{fraction:+.2%}"


def _fp8_gap(fp8: ArmRun, bf16: ArmRun) -> tuple[str, bool]:
    gap = relative_gap(fp8.val_loss, bf16.val_loss)
    return f"{_percent(gap)} ({fp8.val_loss:.4f} vs {bf16.val_loss:.4f})", abs(gap) < FP8_GAP_BOUND


def _maxvio(free: ArmRun, aux: ArmRun) -> tuple[str, bool]:
    return f"{free.maxvio:.3f} vs {aux.maxvio:.3f}", free.maxvio < aux.maxvio


def _loss_gap(arm: ArmRun, baseline: ArmRun) -> tuple[str, bool]:
    gap = relative_gap(arm.val_loss, baseline.val_loss)
    return f"{_percent(gap)} ({arm.val_loss:.4f} vs {baseline.val_loss:.4f})", gap <= 0


def _acceptance(mtp: ArmRun, _: ArmRun) -> tuple[str, bool]:
    if mtp.acceptance is None:
        raise ValueError(f"{mtp.recipe}: no MTP acceptance rate measured (does it have an MTP module?)")
    return f"{mtp.acceptance:.1%}", mtp.acceptance >= PAPER_ACCEPTANCE[0]


# The balancing paper reports perplexity; its loss gap is the gap of log-perplexities.
_PAPER_BALANCE_GAP = relative_gap(math.log(9.50), math.log(9.56))

CLAIMS = {
    "fp8": [
        Claim(
            "validation loss, relative gap (FP8 − BF16) / BF16",
            f"below {FP8_GAP_BOUND:.2%} (16B and 230B MoE)",
            _fp8_gap,
        ),
    ],
    "balancing": [
        Claim("global MaxVio (validation set), loss-free vs aux-loss", "0.04 vs 0.72 (1B MoE)", _maxvio),
        Claim(
            "validation loss, relative gap (loss-free − aux-loss) / aux-loss",
            f"{_percent(_PAPER_BALANCE_GAP)} (perplexity 9.50 vs 9.56)",
            _loss_gap,
        ),
    ],
    "mtp": [
        Claim(
            "main-head validation loss, relative gap (on − off) / off",
            "negative for 15.7B and 228.7B MoEs (may hurt below ~1B)",
            _loss_gap,
        ),
        Claim(
            "acceptance of the MTP-drafted token (greedy speculative decoding)",
            f"{PAPER_ACCEPTANCE[0]:.0%}–{PAPER_ACCEPTANCE[1]:.0%}",
            _acceptance,
        ),
    ],
}
CRITERIA = (
    "As in the paper: FP8 — |gap| < 0.25%; balancing — loss-free MaxVio below aux-loss's and loss gap ≤ 0 (equal or "
    "better); MTP — loss gap ≤ 0 (PAPER.md: MTP can hurt models below ~1B) and acceptance ≥ 85%."
)


def claim_rows(runs: dict[str, ArmRun | None]) -> list[tuple[str, str, str, str, str]]:
    """(ablation title, what, paper, ours, as in the paper) per claim; ours = "missing" when an arm has not run."""
    rows = []
    for ablation in ABLATIONS:
        arm, baseline = runs.get(ablation.arm), runs.get(ablation.baseline)
        for claim in CLAIMS[ablation.name]:
            if arm is None or baseline is None:
                ours, holds = MISSING, MISSING
            else:
                ours, ok = claim.measure(arm, baseline)
                holds = "yes" if ok else "no"
            rows.append((ablation.title, claim.what, claim.paper, ours, holds))
    return rows


# ------------------------------------------------------------------------------------------------ report


def comparison_markdown(
    runs: dict[str, ArmRun | None], plots: dict[str, str], notes: list[str] = (), link_plots: bool = True
) -> str:
    """The ablation report: claims (paper beside ours), the arms, then the paired-curve plots.

    runs: recipe stem -> ArmRun, or None for an arm that has not run; plots: ablation name -> PNG path relative to
    the report, shown as an image, or with link_plots=False as text (for viewers that cannot reach the files)."""
    lines = [
        "# Ablations: the paper's claims at small scale",
        "",
        "Paired pretraining runs that differ in one recipe switch (same seed, data and tokenizer). "
        "A pair that has not run is shown as missing.",
        "",
        "## Claims",
        "",
        "| ablation | compared | paper | ours | as in the paper |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in claim_rows(runs)),
        "",
        CRITERIA,
        "",
        "## Arms",
        "",
        "| ablation | arm | recipe | switch | validation loss (main head) | bits/byte | global MaxVio "
        "| MTP acceptance | steps | pretrain time | MLflow run |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for ablation in ABLATIONS:
        for stem in (ablation.arm, ablation.baseline):
            lines.append(_arm_row(ablation, stem, runs.get(stem)))
    lines.append("")
    if notes:
        lines += [*notes, ""]
    lines += ["## Paired curves", ""]
    for ablation in ABLATIONS:
        plot = plots.get(ablation.name)
        shown = MISSING if not plot else f"![{ablation.name}]({plot})" if link_plots else f"Plot `{plot}`"
        lines += [f"### {ablation.title}", "", shown, ""]
    return "\n".join(lines)


def _arm_row(ablation: Ablation, stem: str, run: ArmRun | None) -> str:
    if run is None:
        return (
            f"| {ablation.name} | {stem} | {MISSING} | {ablation.switch} | "
            + " | ".join([MISSING] * 6)
            + f" | {NONE} |"
        )
    m = run.metrics
    acceptance = f"{run.acceptance:.1%}" if run.acceptance is not None else "n/a (no MTP module)"
    return (
        f"| {ablation.name} | {stem} | {run.recipe} | {ablation.switch} = {run.switch_value} | {run.val_loss:.4f} | "
        f"{m['final_val_bits_per_byte']:.4f} | {run.maxvio:.3f} | {acceptance} | {m['steps']:.0f} | "
        f"{m['stage_seconds']:.0f} s | {run.mlflow_run_id or NONE} |"
    )


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = sorted({r["step"]: r[key] for r in history if key in r}.items())
    return [s for s, _ in points], [v for _, v in points]


def plot_pair(ablation: Ablation, arm: ArmRun, baseline: ArmRun, path: Path) -> Path:
    """Two panels against the optimizer step: training CE (lines) and validation loss (markers) of the main head;
    batch MaxVio (lines) and global MaxVio on the validation set (markers). One colour per arm."""
    fig, (loss_ax, vio_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (stem, run), colour in zip(
        ((ablation.arm, arm), (ablation.baseline, baseline)), ("C0", "C1"), strict=True
    ):
        for ax, line_key, point_key in (
            (loss_ax, "train/ce", "val/loss"),
            (vio_ax, "train/maxvio_batch", "val/maxvio_global"),
        ):
            steps, values = _series(run.history, line_key)
            ax.plot(steps, values, color=colour, alpha=0.5, label=f"{stem} {line_key}")
            steps, values = _series(run.history, point_key)
            ax.plot(steps, values, "o-", color=colour, markersize=4, label=f"{stem} {point_key}")
    loss_ax.set_ylabel("cross-entropy, main head (nats/token)")
    vio_ax.set_ylabel("MaxVio")
    for ax in (loss_ax, vio_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{ablation.title} ({ablation.switch})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
