"""The ablation report: pretraining ablations over several seeds beside the papers' numbers (docs/paper.md).

Each ablation is a set of arms that differ in one recipe switch — same data and tokenizer — each run with the same
seeds; a seed fixes the initialisation and the data order, and arms run with the same seed form a pair:
- FP8 at hidden 512, blockwise vs BF16 (DeepSeek-V3 report §3.3): validation loss within 0.25% of BF16; and
  blockwise vs per-tensor scaling (§3.3.2, the reason for fine-grained scaling: no number published);
- loss-free balancing vs an auxiliary loss vs no balancing (arXiv 2408.15664, §4): global MaxVio 0.04 vs 0.72 at
  equal or better loss (perplexity 9.50 vs 9.56);
- MTP on vs off (report §2.2, §5.4.3): the main head's validation loss (MTP helped 15.7B and 228.7B MoEs, may hurt
  below ~1B) and the acceptance of the MTP-drafted token in speculative decoding (85–90%), read teacher-forced on
  held-out text (dsv3.eval.acceptance): these small models' own greedy continuations loop.

Each run's quantity is read the same way (`second_half_mean`): the mean of its validation evaluations after half of
its steps — the same validation rows at the same steps in every arm and seed. A claim is judged on the paired
differences d_s (arm − baseline, same seed s) through the 95% confidence interval of their mean, d̄ ± h with
h = t(0.975, n−1)·sd/√n (`confidence_half_width`; `verdict`): a direction claim holds when |d̄| > h and d̄ has the
paper's sign, fails when |d̄| > h with the other sign, and is "not resolved" otherwise; a bound claim (|gap| < 0.25%)
holds when |d̄| + h is below the bound and fails when |d̄| − h is above it; a threshold on one arm (acceptance ≥ 85%)
uses its per-seed values the same way. One seed resolves nothing; for a claim left unresolved `seeds_to_decide` gives
the number of seeds at which the measured d̄ and sd would decide it.

This module sees a run only as an `ArmRun` (one seed of one arm: the pretrain stage's metrics and per-step history,
the acceptance rate); the flow (flows/ablations.py) reads those from the stage folders. It writes the comparison as
markdown — the claims (paper beside ours, with spreads), the arms (mean ± sd), every per-seed value, "missing" where
an arm has not run, never a zero — and the curves: one PNG per ablation (loss and MaxVio against the step, mean over
seeds with the seeds' range) and, for balancing, MaxVio per MoE layer.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scipy import stats

from dsv3.plotting import plt

MISSING = "missing"
NONE = "—"
HOLDS, FAILS, UNRESOLVED = "yes", "no", "not resolved"
FP8_GAP_BOUND = 0.0025  # report §3.3: relative loss error below 0.25%
PAPER_ACCEPTANCE = (0.85, 0.90)  # report §5.4.3
CONFIDENCE = 0.95  # a difference counts when the two-sided 95% confidence interval of its mean excludes zero
MAX_SEEDS = 1000  # seeds_to_decide looks no further


@dataclass(frozen=True)
class Ablation:
    """Arms that differ in `switch` (and the settings in `also` that go with it): `arms[0]` is the paper's technique.

    Arms are recipe file stems (recipes/ablations/<stem>.yaml); `name` is the MLflow tag `ablation`."""

    name: str
    title: str
    switch: str
    arms: tuple[str, ...]
    also: tuple[str, ...] = ()


ABLATIONS = (
    Ablation(
        "fp8",
        "FP8 at hidden 512: blockwise vs per-tensor scaling vs BF16",
        "pretrain.precision",
        ("fp8-wide", "fp8-wide-tensorwise", "fp8-wide-bf16"),
    ),
    Ablation(
        "balancing",
        "loss-free vs auxiliary-loss vs no balancing",
        "pretrain.balancing",
        ("loss-free", "aux-loss", "no-balancing"),
        also=("model.aux_loss_alpha",),
    ),
    Ablation("mtp", "MTP on vs off", "model.num_nextn_predict_layers", ("mtp-on", "mtp-off")),
)
ARMS = {stem: a for a in ABLATIONS for stem in a.arms}


@dataclass
class ArmRun:
    """One seed of one finished arm: its recipe name, the switch's value and its companions' ({dotted key: value}), the
    pretrain stage's metrics (final_val_loss, mtp_acceptance on greedy continuations, ...) and history (records
    {"step", "val/loss", "train/ce", "train/maxvio_batch", "train/maxvio_batch_layer<i>", "val/maxvio_global", ...}),
    the MTP acceptance teacher-forced on held-out text (None: no MTP module), the pretrain stage's MLflow run and the
    seed."""

    recipe: str
    switch_value: dict[str, Any]
    metrics: dict[str, float]
    history: list[dict[str, float]]
    acceptance: float | None = None
    mlflow_run_id: str | None = None
    seed: int = 0

    @property
    def val_loss(self) -> float:
        """The main head's validation loss, mean of the second half's evaluations."""
        return second_half_mean(self.history, "val/loss")

    @property
    def maxvio(self) -> float:
        """Global MaxVio on the validation set, mean of the second half's evaluations."""
        return second_half_mean(self.history, "val/maxvio_global")


def second_half_mean(history: list[dict[str, float]], key: str) -> float:
    """The mean of `key` over the evaluations after half of the run's steps (the last step in `history`).

    A claim's estimator: one evaluation wobbles with the step it falls on (trajectories of two arms diverge within
    tens of steps), the mean of several damps that; starting at half the run skips the routers' early collapse
    (README, Ablations) and the warm-up. ValueError when no evaluation of `key` falls in the second half."""
    last = max((r["step"] for r in history), default=0.0)
    values = [r[key] for r in history if key in r and r["step"] > last / 2]
    if not values:
        raise ValueError(f"no {key} evaluation after step {last / 2:g} of {last:g}: evaluate more often")
    return statistics.fmean(values)


Seeds = dict[int, ArmRun]  # seed -> that seed's run of one arm
Runs = dict[str, Seeds]  # arm stem -> its seeds (empty or absent: the arm has not run)


def relative_gap(value: float, reference: float) -> float:
    """(value − reference) / reference: the report's "relative loss error" of FP8 against BF16 (§3.3)."""
    if reference == 0 or not math.isfinite(reference):
        raise ValueError(f"relative gap: the reference must be finite and non-zero, got {reference}")
    return (value - reference) / reference


def recipe_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value in a, value in b)} for every key where two flattened recipes differ, the name aside."""
    keys = (set(a) | set(b)) - {"name"}
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}


def check_pair(ablation: Ablation, arm: dict[str, Any], baseline: dict[str, Any], stems: tuple[str, str] | None = None) -> None:
    """Raise ValueError unless the two flattened recipes differ in the ablation's switch and nothing else (but the
    settings that go with it). `stems` names the two files in the message (default: the ablation's first two arms)."""
    diff = recipe_differences(arm, baseline)
    if ablation.switch not in diff or not set(diff) <= {ablation.switch, *ablation.also}:
        shown = ", ".join(f"{k}: {va!r} vs {vb!r}" for k, (va, vb) in diff.items()) or "nothing"
        a, b = stems or ablation.arms[:2]
        raise ValueError(
            f"ablation {ablation.name}: {a} and {b} must differ only in {ablation.switch} "
            f"(they differ in {shown}); edit recipes/ablations/{a}.yaml or {b}.yaml"
        )


# ------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n − 1) of n values; sd is NaN for one value."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


Kind = Literal["direction", "bound", "threshold"]


def confidence_half_width(sd: float, n: int) -> float:
    """h = t(0.975, n − 1)·sd/√n: the half-width of the two-sided 95% confidence interval of a mean of n paired
    differences (Student's t; n ≥ 2)."""
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)


def _decide(mean: float, h: float, kind: Kind, target: float) -> str:
    if kind == "direction":
        if abs(mean) > h:
            return HOLDS if math.copysign(1.0, mean) == math.copysign(1.0, target) else FAILS
        return UNRESOLVED
    if kind == "bound":
        return HOLDS if abs(mean) + h < target else FAILS if abs(mean) - h > target else UNRESOLVED
    if kind == "threshold":
        return HOLDS if mean - h >= target else FAILS if mean + h < target else UNRESOLVED
    raise ValueError(f"unknown claim kind {kind!r}")


def verdict(values: list[float], kind: Kind, target: float) -> str:
    """HOLDS / FAILS / UNRESOLVED for per-seed values (paired differences, or one arm's values for a threshold),
    with h the confidence half-width of their mean d̄.

    direction (target = the paper's sign, ±1): holds iff |d̄| > h and sign(d̄) = target; fails iff |d̄| > h with the
    other sign. bound (target = B): holds iff |d̄| + h < B; fails iff |d̄| − h > B. threshold (target = T): holds iff
    d̄ − h ≥ T; fails iff d̄ + h < T. Otherwise, and with fewer than two seeds, not resolved."""
    if kind not in ("direction", "bound", "threshold"):
        raise ValueError(f"unknown claim kind {kind!r}")
    if len(values) < 2:
        return UNRESOLVED
    s = Spread.of(values)
    return _decide(s.mean, confidence_half_width(s.sd, s.n), kind, target)


def seeds_to_decide(values: list[float], kind: Kind, target: float) -> int | None:
    """The fewest seeds at which the measured mean and sd would decide the claim (holds or no) — the sample size to
    plan for an unresolved one; None when no number up to MAX_SEEDS would (fewer than two values, or a mean on the
    bound itself)."""
    if len(values) < 2:
        return None
    s = Spread.of(values)
    for n in range(2, MAX_SEEDS + 1):
        if _decide(s.mean, confidence_half_width(s.sd, n), kind, target) != UNRESOLVED:
            return n
    return None


RULE = (
    "**Rule.** Each run's quantity is the mean of its validation evaluations after half of its steps (the same "
    "validation rows at the same steps in every run). d_s = the arm's quantity minus the baseline's with the same "
    "seed s; d̄ and sd are the mean and the sample standard deviation of d_s over the n seeds, and h = "
    "t(0.975, n−1)·sd/√n is the half-width of the 95% confidence interval of d̄ (n = 3: h = 2.48·sd; n = 5: 1.24·sd). "
    "A direction claim holds when |d̄| > h and d̄ has the paper's sign (\"no\": beyond h with the other sign); the "
    "FP8 bound holds when |d̄| + h < 0.25% (\"no\": |d̄| − h > 0.25%); the acceptance threshold holds when mean − h "
    "≥ 85% (\"no\": mean + h < 85%). Anything else, or one seed, is **not resolved**: the difference is within the "
    "seed-to-seed noise; \"seeds to decide\" is the number of seeds at which the measured d̄ and sd would decide it."
)

FP8_NOTE = (
    "**FP8 on CPUs and GPUs.** Here every FP8 GEMM is emulated (quantise to E4M3 with the arm's scales → dequantise → "
    "fp32 matmul: the rounding of the GPU path, not its speed), so the FP8 rows compare numerics. On a GPU the same arms "
    "run real FP8 GEMMs with `pretrain.fp8_backend: scaled_mm`: blockwise through `torch.nn.functional.scaled_mm` with "
    "`ScalingType.BlockWise1x128` (activations, gradients) and `BlockWise128x128` (weights) — cuBLAS on sm_90 with "
    "CUDA ≥ 12.9, the scheme DeepGEMM implements — and per-tensor through `ScalingType.TensorWise` (sm_89 and later). "
    "No GPU figures are claimed here."
)

# ------------------------------------------------------------------------------------------------ claims


@dataclass(frozen=True)
class Claim:
    """One published claim: what is compared, the paper's value, the arms (baseline None: the arm's own value), the
    per-seed quantity of one run and how two seeds' quantities make d_s (`compare`), how to print both, and how d_s
    is judged (`verdict`'s kind and target)."""

    ablation: str
    what: str
    paper: str
    arm: str
    baseline: str | None
    quantity: Callable[[ArmRun], float]
    compare: Literal["relative", "difference", "value"]
    kind: Kind
    target: float
    quantity_format: str = "{:.4f}"
    show: Callable[[float], str] = "{:+.2%}".format

    def per_seed(self, arm: ArmRun, baseline: ArmRun | None) -> float:
        """d_s: the relative gap or the difference of the two runs' quantities, or the arm's own value."""
        if self.compare == "value":
            return self.quantity(arm)
        a, b = self.quantity(arm), self.quantity(baseline)
        return relative_gap(a, b) if self.compare == "relative" else a - b


def _val_loss(run: ArmRun) -> float:
    return run.val_loss


def _maxvio(run: ArmRun) -> float:
    return run.maxvio


def _acceptance(run: ArmRun) -> float:
    if run.acceptance is None:
        raise ValueError(f"{run.recipe}: no MTP acceptance rate measured (does it have an MTP module?)")
    return run.acceptance


# The balancing paper reports perplexity; its loss gap is the gap of log-perplexities.
_PAPER_BALANCE_GAP = relative_gap(math.log(9.50), math.log(9.56))
_MAXVIO = {"quantity": _maxvio, "compare": "difference", "quantity_format": "{:.3f}", "show": "{:+.3f}".format}

CLAIMS = (
    Claim("fp8", "validation loss, relative gap (FP8 blockwise − BF16) / BF16",
          f"below {FP8_GAP_BOUND:.2%} (16B and 230B MoE)", "fp8-wide", "fp8-wide-bf16",
          _val_loss, "relative", "bound", FP8_GAP_BOUND),
    Claim("fp8", "validation loss, relative gap (per-tensor − blockwise) / blockwise",
          "> 0: fine-grained scaling absorbs the outliers per-tensor scaling cannot (§3.3.2; no number published)",
          "fp8-wide-tensorwise", "fp8-wide", _val_loss, "relative", "direction", +1.0),
    Claim("balancing", "global MaxVio (validation set), loss-free − aux-loss", "0.04 vs 0.72 (1B MoE): lower",
          "loss-free", "aux-loss", kind="direction", target=-1.0, **_MAXVIO),
    Claim("balancing", "validation loss, relative gap (loss-free − aux-loss) / aux-loss",
          f"{_PAPER_BALANCE_GAP:+.2%} (perplexity 9.50 vs 9.56)", "loss-free", "aux-loss",
          _val_loss, "relative", "direction", -1.0),
    Claim("balancing", "global MaxVio (validation set), loss-free − no balancing",
          "lower (not in the paper's tables: unbalanced routing is why balancing exists)", "loss-free", "no-balancing",
          kind="direction", target=-1.0, **_MAXVIO),
    Claim("mtp", "main-head validation loss, relative gap (on − off) / off",
          "negative for 15.7B and 228.7B MoEs (may hurt below ~1B)", "mtp-on", "mtp-off",
          _val_loss, "relative", "direction", -1.0),
    Claim("mtp", "acceptance of the MTP-drafted token, teacher-forced on held-out text",
          f"{PAPER_ACCEPTANCE[0]:.0%}–{PAPER_ACCEPTANCE[1]:.0%}", "mtp-on", None,
          _acceptance, "value", "threshold", PAPER_ACCEPTANCE[0], show="{:.1%}".format),
)


@dataclass(frozen=True)
class ClaimResult:
    """A claim measured on the seeds both arms ran: per-seed d_s (or the arm's own values), their spread, the
    verdict, and each arm's own quantity as "mean ± sd vs mean ± sd" (`sides`; empty for a one-arm claim)."""

    claim: Claim
    per_seed: dict[int, float]
    spread: Spread | None
    verdict: str
    sides: str


def claim_result(claim: Claim, runs: Runs) -> ClaimResult:
    """The claim on the seeds that both of its arms ran (MISSING when there are none)."""
    arm = runs.get(claim.arm) or {}
    base = (runs.get(claim.baseline) or {}) if claim.baseline else arm
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return ClaimResult(claim, {}, None, MISSING, MISSING)
    per_seed = {s: claim.per_seed(arm[s], base[s] if claim.baseline else None) for s in seeds}
    sides = ""
    if claim.baseline:
        sides = " vs ".join(
            _mean_sd([claim.quantity(runs[stem][s]) for s in seeds], claim.quantity_format)
            for stem in (claim.arm, claim.baseline)
        )
    values = list(per_seed.values())
    return ClaimResult(claim, per_seed, Spread.of(values), verdict(values, claim.kind, claim.target), sides)


def _mean_sd(values: list[float], fmt: str) -> str:
    s = Spread.of(values)
    return fmt.format(s.mean) if s.n == 1 else f"{fmt.format(s.mean)} ± {fmt.format(s.sd)}"


def _shown(result: ClaimResult) -> str:
    """'d̄ ± sd (n seeds)' in the claim's units."""
    s, show = result.spread, result.claim.show
    if s is None:
        return MISSING
    if s.n == 1:
        return f"{show(s.mean)} (1 seed)"
    spread = show(s.sd).lstrip("+")
    return f"{show(s.mean)} ± {spread} ({s.n} seeds)"


def _to_decide(result: ClaimResult) -> str:
    """'—' for a decided (or missing) claim, else the seeds that the measured d̄ and sd would need."""
    if result.verdict != UNRESOLVED or result.spread is None:
        return NONE
    n = seeds_to_decide(list(result.per_seed.values()), result.claim.kind, result.claim.target)
    return f"> {MAX_SEEDS}" if n is None else str(n)


def claim_rows(runs: Runs) -> list[tuple[str, str, str, str, str, str, str]]:
    """(ablation title, what, paper, ours per arm, d̄ ± sd, verdict, seeds to decide) per claim; MISSING where an arm
    has not run."""
    titles = {a.name: a.title for a in ABLATIONS}
    rows = []
    for claim in CLAIMS:
        result = claim_result(claim, runs)
        rows.append((
            titles[claim.ablation], claim.what, claim.paper, result.sides or NONE, _shown(result), result.verdict,
            _to_decide(result),
        ))
    return rows


# ------------------------------------------------------------------------------------------------ report


def comparison_markdown(
    runs: Runs, plots: dict[str, list[str]], notes: list[str] = (), link_plots: bool = True, seeds: list[int] | None = None
) -> str:
    """The ablation report: claims (paper beside ours, with spreads and the rule), the arms (mean ± sd), the values
    of every seed, then the plots.

    runs: arm stem -> {seed: ArmRun} (absent or empty: not run); plots: ablation name -> PNG paths relative to the
    report, shown as images, or with link_plots=False as text (for viewers that cannot reach the files); seeds: the
    seeds asked for (default: those found)."""
    seeds = seeds if seeds is not None else sorted({s for arm in runs.values() for s in arm})
    lines = [
        "# Ablations: the paper's claims at small scale, over seeds",
        "",
        f"Arms of one ablation differ in one recipe switch (same data and tokenizer); each runs with the seeds "
        f"{', '.join(map(str, seeds)) or NONE}, and arms with the same seed (same initialisation and data order) are "
        "paired. An arm that has not run is shown as missing.",
        "",
        "**What these runs cannot show.** A few minutes of a 2-core CPU trains ~6·10^5 tokens an arm; in-context copying "
        "(induction heads) needs on the order of 10^7 tokens at these batch and context sizes (Olsson et al. 2022; "
        "Aoyama et al. 2025: ~10^5.7·√(batch·context) tokens), so passkey retrieval and GRPO gains on held-out "
        "arithmetic are out of reach here; the probe recipes (`dsv3 probes`, recipes/probes/) isolate those effects "
        "on data where a CPU can show them.",
        "",
        "## Claims",
        "",
        "| ablation | compared | paper | ours: arm vs baseline (mean ± sd) | paired difference d̄ ± sd | holds "
        "| seeds to decide |",
        "|---|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in claim_rows(runs)),
        "",
        RULE,
        "",
        FP8_NOTE,
        "",
        "## Arms",
        "",
        "| ablation | arm | recipe | switch | seeds | validation loss (main head; second half) | final bits/byte "
        "| global MaxVio (second half) | MTP acceptance: teacher-forced / greedy | steps | pretrain time |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for ablation in ABLATIONS:
        for stem in ablation.arms:
            lines.append(_arm_row(ablation, stem, runs.get(stem) or {}))
    lines.append("")
    if notes:
        lines += [*notes, ""]
    lines += ["## Per seed", ""]
    lines += _per_seed_tables(runs, seeds)
    lines += ["## Curves", "", "Lines: the mean over seeds; bands: the seeds' range.", ""]
    for ablation in ABLATIONS:
        shown = [f"![{ablation.name}]({p})" if link_plots else f"Plot `{p}`" for p in plots.get(ablation.name, [])]
        lines += [f"### {ablation.title}", "", *(shown or [MISSING]), ""]
    return "\n".join(lines)


def _arm_row(ablation: Ablation, stem: str, seeds: Seeds) -> str:
    if not seeds:
        return f"| {ablation.name} | {stem} | {MISSING} | {ablation.switch} | 0 | " + " | ".join([MISSING] * 6) + " |"
    runs = [seeds[s] for s in sorted(seeds)]
    first = runs[0]
    switch = "; ".join(f"{k} = {v}" for k, v in first.switch_value.items())
    acceptance = "n/a (no MTP module)"
    if all(r.acceptance is not None for r in runs):
        greedy = [r.metrics["mtp_acceptance"] for r in runs if "mtp_acceptance" in r.metrics]
        acceptance = _mean_sd([r.acceptance for r in runs], "{:.1%}") + (
            f" / {_mean_sd(greedy, '{:.1%}')}" if len(greedy) == len(runs) else ""
        )
    cells = [
        _mean_sd([r.val_loss for r in runs], "{:.4f}"),
        _mean_sd([r.metrics["final_val_bits_per_byte"] for r in runs], "{:.4f}"),
        _mean_sd([r.maxvio for r in runs], "{:.3f}"),
        acceptance,
        f"{first.metrics['steps']:.0f}",
        _mean_sd([r.metrics["stage_seconds"] for r in runs], "{:.0f}") + " s",
    ]
    return f"| {ablation.name} | {stem} | {first.recipe} | {switch} | {len(runs)} | {' | '.join(cells)} |"


def _per_seed_tables(runs: Runs, seeds: list[int]) -> list[str]:
    """One table per claim: each seed's arm and baseline values and d_s; then each arm's values per seed."""
    lines = []
    for claim in CLAIMS:
        result = claim_result(claim, runs)
        head = f"**{claim.what}** ({claim.arm}" + (f" vs {claim.baseline})" if claim.baseline else ")")
        lines += [head, "", "| seed | " + ("value |" if claim.baseline is None else "arm | baseline | d_s |"), "|---|---|" + ("" if claim.baseline is None else "---|---|")]
        for seed in seeds:
            if seed not in result.per_seed:
                lines.append(f"| {seed} | " + " | ".join([MISSING] * (1 if claim.baseline is None else 3)) + " |")
                continue
            if claim.baseline is None:
                lines.append(f"| {seed} | {claim.show(result.per_seed[seed])} |")
                continue
            arm, base = (claim.quantity_format.format(claim.quantity(runs[stem][seed])) for stem in (claim.arm, claim.baseline))
            lines.append(f"| {seed} | {arm} | {base} | {claim.show(result.per_seed[seed])} |")
        lines.append("")
    lines += ["**Every arm** (validation loss / global MaxVio / MTP acceptance; MLflow run of the pretrain stage)", "",
              "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for ablation in ABLATIONS:
        for stem in ablation.arms:
            cells = []
            for seed in seeds:
                run = (runs.get(stem) or {}).get(seed)
                if run is None:
                    cells.append(MISSING)
                    continue
                acc = f" / {run.acceptance:.1%}" if run.acceptance is not None else ""
                cells.append(f"{run.val_loss:.4f} / {run.maxvio:.3f}{acc} ({run.mlflow_run_id or NONE})")
            lines.append(f"| {stem} | {' | '.join(cells)} |")
    return [*lines, ""]


# ------------------------------------------------------------------------------------------------ plots


def _series(history: list[dict[str, float]], key: str) -> dict[float, float]:
    return {r["step"]: r[key] for r in history if key in r}


def _band(ax, seeds: Seeds, key: str, colour: str, label: str, marker: str | None = None) -> None:
    """The mean over seeds of `key` against the step (a line, or markers), and the seeds' min–max as a band."""
    series = [_series(run.history, key) for run in seeds.values()]
    steps = sorted(set().union(*series)) if series else []
    if not steps:
        return
    values = [[s[step] for s in series if step in s] for step in steps]
    mean = [statistics.fmean(v) for v in values]
    ax.plot(steps, mean, f"{marker}-" if marker else "-", color=colour, markersize=4, label=label)
    if len(seeds) > 1:
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15, linewidth=0)


def plot_curves(ablation: Ablation, runs: Runs, path: Path) -> Path:
    """Two panels against the optimizer step, one colour per arm: training CE (line) and validation loss (markers)
    of the main head; batch MaxVio (line) and global MaxVio on the validation set (markers). Mean over seeds, the
    seeds' range as a band."""
    fig, (loss_ax, vio_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stem, colour in zip(ablation.arms, ("C0", "C1", "C2", "C3"), strict=False):
        seeds = runs.get(stem) or {}
        for ax, line_key, point_key in ((loss_ax, "train/ce", "val/loss"), (vio_ax, "train/maxvio_batch", "val/maxvio_global")):
            _band(ax, seeds, line_key, colour, f"{stem} {line_key}")
            _band(ax, seeds, point_key, colour, f"{stem} {point_key}", marker="o")
    loss_ax.set_ylabel("cross-entropy, main head (nats/token)")
    vio_ax.set_ylabel("MaxVio")
    for ax in (loss_ax, vio_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    n = max((len(runs.get(stem) or {}) for stem in ablation.arms), default=0)
    fig.suptitle(f"{ablation.title} ({ablation.switch}; {n} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def moe_layers(runs: Runs, stems: tuple[str, ...]) -> list[int]:
    """The decoder layers whose per-layer MaxVio the arms' histories hold (train/maxvio_batch_layer<i>)."""
    found = {
        int(m.group(1))
        for stem in stems
        for run in (runs.get(stem) or {}).values()
        for record in run.history
        for key in record
        if (m := re.fullmatch(r"train/maxvio_batch_layer(\d+)", key))
    }
    return sorted(found)


def plot_maxvio(ablation: Ablation, runs: Runs, path: Path) -> Path:
    """MaxVio against the step as the balancing paper plots it, one colour per arm: the first panel averaged over the
    MoE layers (batch MaxVio as a line, global MaxVio on the validation set as markers), then one panel per MoE
    layer (the same two for that layer alone). Mean over seeds, the seeds' range as a band."""
    layers = moe_layers(runs, ablation.arms)
    panels = [("all MoE layers (mean)", "train/maxvio_batch", "val/maxvio_global")] + [
        (f"layer {i}", f"train/maxvio_batch_layer{i}", f"val/maxvio_global_layer{i}") for i in layers
    ]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax, (title, batch_key, global_key) in zip(axes.flat, panels, strict=False):
        for stem, colour in zip(ablation.arms, ("C0", "C1", "C2", "C3"), strict=False):
            seeds = runs.get(stem) or {}
            _band(ax, seeds, batch_key, colour, f"{stem} batch")
            _band(ax, seeds, global_key, colour, f"{stem} global (validation)", marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("MaxVio = (max load − mean) / mean")
    axes[0][0].legend(fontsize=7)
    n = max((len(runs.get(stem) or {}) for stem in ablation.arms), default=0)
    fig.suptitle(f"MaxVio over training: {', '.join(ablation.arms)} ({n} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
