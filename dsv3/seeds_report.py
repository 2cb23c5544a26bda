"""The pipeline over seeds: every stage's headline metrics as mean ± sd with the per-seed values
(`dsv3 run --seeds N`, `make pipeline SEEDS=N`; flows/seeds.py runs the seeds and calls this).

It reads only the stages' manifests in each seed's run folder (runs/<recipe>/<variant>/<stage>/stage.json), so it
can be written for seeds that finished, failed or stopped: a stage without a completed manifest shows "—" for that
seed and its mean and sd are over the seeds that have the value (the count is shown). sd is the sample standard
deviation (n − 1); one seed has none.

One paired comparison is computed, because it is the pipeline's own claim: RL's held-out accuracy minus the SFT
model's on the same problems, per seed, d̄ ± sd — "holds" when d̄ > 2·sd (and more than one seed), the rule the
ablations use (dsv3.ablation_report).
"""

from __future__ import annotations

import html
import statistics
from dataclasses import dataclass
from pathlib import Path

from dsv3.config import stage_order
from dsv3.io import write_text_atomic
from dsv3.stages import headline
from dsv3.store.manifest import read_manifest

SEEDS_MD = "seeds.md"
SEEDS_HTML = "seeds.html"
NOISE_SDS = 2.0
NONE = "—"
PAIRED = (("rl", "heldout_accuracy_rl"), ("rl", "heldout_accuracy_sft"))  # RL minus SFT, same problems


@dataclass(frozen=True)
class SeedRun:
    """One seed's run folder and the headline metrics of each completed stage ({stage: {metric: value}})."""

    seed: int
    root: Path
    metrics: dict[str, dict[str, float]]
    failed: dict[str, str]  # stage -> status, for stages that ran but did not complete


def read_seed_run(seed: int, root: Path) -> SeedRun:
    """The headline metrics of every completed stage under `root`, and the stages that ran without completing."""
    metrics, failed = {}, {}
    for stage in stage_order():
        manifest = read_manifest(root / stage)
        if manifest is None:
            continue
        if manifest.status == "completed" and not manifest.failed_checks:
            metrics[stage] = headline(stage, manifest.metrics)
        else:
            failed[stage] = manifest.status if manifest.status != "completed" else "failed checks"
    return SeedRun(seed, root, metrics, failed)


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class PerSeed:
    """Values per seed, with their mean and sample sd."""

    values: dict[int, float]  # seed -> value

    @property
    def mean(self) -> float:
        return mean_sd(list(self.values.values()))[0]

    @property
    def sd(self) -> float | None:
        return mean_sd(list(self.values.values()))[1]


@dataclass(frozen=True)
class MetricRow(PerSeed):
    stage: str = ""
    metric: str = ""


def metric_rows(runs: list[SeedRun]) -> list[MetricRow]:
    """One row per (stage, headline metric) any seed has, in stage order then headline order."""
    rows = []
    for stage in stage_order():
        names: list[str] = []
        for run in runs:
            names += [m for m in run.metrics.get(stage, {}) if m not in names]
        for metric in names:
            values = {r.seed: r.metrics[stage][metric] for r in runs if metric in r.metrics.get(stage, {})}
            rows.append(MetricRow(values, stage, metric))
    return rows


@dataclass(frozen=True)
class PairedDifference(PerSeed):
    """RL minus SFT held-out accuracy per seed (`values`), its mean and sd, and the verdict."""

    @property
    def verdict(self) -> str:
        """'holds' when d̄ > 2·sd over >= 2 seeds, 'no' when d̄ < −2·sd, else 'not resolved'."""
        if self.sd is None:
            return "not resolved (one seed)"
        if self.mean > NOISE_SDS * self.sd:
            return "holds"
        return "no" if self.mean < -NOISE_SDS * self.sd else "not resolved"


def rl_gain(runs: list[SeedRun]) -> PairedDifference | None:
    """RL's held-out accuracy minus SFT's, per seed that finished RL (None: no seed did)."""
    (stage, rl), (_, sft) = PAIRED
    differences = {r.seed: r.metrics[stage][rl] - r.metrics[stage][sft] for r in runs if rl in r.metrics.get(stage, {})}
    return PairedDifference(differences) if differences else None


def _fmt(value: float | None) -> str:
    return NONE if value is None else f"{value:.4g}"


def seeds_markdown(runs: list[SeedRun], command: str) -> str:
    """The table: stage, metric, mean ± sd (n), then one column per seed; the RL-over-SFT paired difference; the
    stages that failed."""
    seeds = [r.seed for r in runs]
    lines = [
        f"# {len(runs)} seeds: {', '.join(map(str, seeds))}",
        "",
        f"Command: `{command}`  ",
        "Run folders: " + ", ".join(f"`{r.root}`" for r in runs),
        "",
        "| stage | metric | mean ± sd (n) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|---|" + "---:|" * len(seeds),
    ]
    for row in metric_rows(runs):
        cells = [_fmt(row.values.get(s)) for s in seeds]
        lines.append(f"| {row.stage} | {row.metric} | {_fmt(row.mean)} ± {_fmt(row.sd)} ({len(row.values)}) | " + " | ".join(cells) + " |")
    gain = rl_gain(runs)
    if gain is not None:
        per_seed = ", ".join(f"seed {s}: {d:+.4g}" for s, d in gain.values.items())
        lines += [
            "",
            f"**RL over SFT, held-out accuracy (paired per seed):** d̄ = {gain.mean:+.4g} ± {_fmt(gain.sd)} — "
            f"{gain.verdict} (holds when d̄ > {NOISE_SDS:g}·sd). {per_seed}.",
        ]
    failures = [f"seed {r.seed}: {stage} {status}" for r in runs for stage, status in r.failed.items()]
    if failures:
        lines += ["", "**Did not complete:** " + "; ".join(failures) + "."]
    return "\n".join(lines) + "\n"


def seeds_html(runs: list[SeedRun], command: str) -> str:
    """The same table as a self-contained HTML page."""
    seeds = [r.seed for r in runs]
    head = "".join(f"<th>seed {s}</th>" for s in seeds)
    body = []
    for row in metric_rows(runs):
        cells = "".join(f"<td>{_fmt(row.values.get(s))}</td>" for s in seeds)
        body.append(
            f"<tr><td>{html.escape(row.stage)}</td><td>{html.escape(row.metric)}</td>"
            f"<td>{_fmt(row.mean)} ± {_fmt(row.sd)} ({len(row.values)})</td>{cells}</tr>"
        )
    gain = rl_gain(runs)
    note = (
        f"<p><b>RL over SFT, held-out accuracy (paired per seed):</b> d̄ = {gain.mean:+.4g} ± {_fmt(gain.sd)} — "
        f"{html.escape(gain.verdict)}</p>"
        if gain
        else ""
    )
    failures = [f"seed {r.seed}: {stage} {status}" for r in runs for stage, status in r.failed.items()]
    failed = f"<p><b>Did not complete:</b> {html.escape('; '.join(failures))}</p>" if failures else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>dsv3 over seeds</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}td:nth-child(-n+2){text-align:left}</style></head><body>"
        f"<h1>{len(runs)} seeds: {', '.join(map(str, seeds))}</h1><p>Command: <code>{html.escape(command)}</code></p>"
        f"<table><tr><th>stage</th><th>metric</th><th>mean ± sd (n)</th>{head}</tr>{''.join(body)}</table>"
        f"{note}{failed}</body></html>"
    )


def write_seeds_report(folder: Path, runs: list[SeedRun], command: str) -> tuple[Path, Path]:
    """seeds.md and seeds.html in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    md, page = folder / SEEDS_MD, folder / SEEDS_HTML
    write_text_atomic(md, seeds_markdown(runs, command))
    write_text_atomic(page, seeds_html(runs, command))
    return md, page
