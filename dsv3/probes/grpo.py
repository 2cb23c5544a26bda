"""The GRPO probe's table (recipes/probes/grpo.yaml, a pipeline recipe: tokenizer → pretrain → sft → reward → rl on a
task the SFT model gets partly right): per seed, the mean training reward over GRPO steps with its spread over the
step's completions, and held-out accuracy of the SFT model against the RL model (greedy, and pass@k).

Read from a finished pipeline run: the rl stage's manifest (held-out scores of both models) and its MLflow run (TRL's
per-step `reward`, `reward_std` and each reward function's mean and std, logged under train/).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from dsv3.config import Recipe
from dsv3.plotting import plt
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import tracking_uri

SERIES = {  # what the table and the plot read, MLflow name -> short name
    "train/reward": "reward",
    "train/reward_std": "reward_std",
    "train/rewards/correctness_reward/mean": "correct",
    "train/rewards/correctness_reward/std": "correct_std",
}
WINDOW = 5  # steps averaged at the start and at the end of GRPO


def grpo_result(runs_dir: str | Path, recipe: Recipe) -> dict[str, Any] | None:
    """One seed's GRPO probe: {"seed", "steps": [{step, reward, reward_std, correct, correct_std}], "metrics": the rl
    stage's, "heldout": problems scored}; None while its rl stage has not completed."""
    root = run_root(runs_dir, recipe)
    manifest = read_manifest(root / "rl")
    if manifest is None or manifest.status != "completed":
        return None
    client = MlflowClient(tracking_uri(runs_dir))
    steps: dict[int, dict[str, float]] = {}
    for name, short in SERIES.items():
        for m in client.get_metric_history(manifest.mlflow_run_id, name) if manifest.mlflow_run_id else []:
            steps.setdefault(int(m.step), {"step": int(m.step)})[short] = m.value
    return {
        "seed": recipe.seed,
        "steps": [steps[s] for s in sorted(steps)],
        "metrics": manifest.metrics,
        "heldout": recipe.rl.heldout_problems,
        "eval_k": recipe.rl.eval_k,
        "sft_epochs": recipe.sft.epochs,
        "task": f"{'/'.join(recipe.sft.problem_kinds)}, {recipe.sft.problem_steps} step(s), numbers up to {recipe.sft.max_operand}",
        "rl_steps": recipe.rl.steps,
        "group": recipe.rl.num_generations,
        "prompts": recipe.rl.prompts_per_step,
    }


def _window(rows: list[dict[str, float]], key: str, last: bool) -> str:
    values = [r[key] for r in (rows[-WINDOW:] if last else rows[:WINDOW]) if key in r]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def _binomial(p: float, n: int) -> str:
    """p as a percentage with its standard error sqrt(p(1−p)/n)."""
    return f"{p:.1%} ± {math.sqrt(p * (1 - p) / n):.1%}"


def markdown(results: list[dict[str, Any]], plot_name: str | None = None) -> str:
    """The GRPO table: per seed, the reward at the start and the end of GRPO (mean ± sd over WINDOW steps), the
    correctness reward likewise, and held-out greedy accuracy and pass@k of the SFT and RL models (± binomial standard
    error); then the change RL − SFT over seeds."""
    if not results:
        return "missing: the GRPO probe has not run (`dsv3 probes --only grpo`)"
    first = results[0]
    k, n = first["eval_k"], first["heldout"]
    lines = [
        f"Task: {first['task']}; SFT {first['sft_epochs']} epochs, then GRPO for {first['rl_steps']} steps of "
        f"{first['prompts']} prompts × G = {first['group']} completions; held-out: {n} problems never trained on. Reward "
        f"columns: mean ± sd over the first / last {WINDOW} steps of the per-step mean (each step's own spread over its "
        "completions is in the plot); accuracies ± binomial standard error.",
        "",
        f"| seed | reward, first {WINDOW} steps | reward, last {WINDOW} | correctness reward, first {WINDOW} | last {WINDOW} "
        f"| greedy accuracy SFT | RL | pass@{k} SFT | RL |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {r['seed']} | {_window(r['steps'], 'reward', False)} | {_window(r['steps'], 'reward', True)} | "
            f"{_window(r['steps'], 'correct', False)} | {_window(r['steps'], 'correct', True)} | "
            f"{_binomial(m['heldout_accuracy_sft'], n)} | {_binomial(m['heldout_accuracy_rl'], n)} | "
            f"{_binomial(m[f'heldout_pass_at_{k}_sft'], n)} | {_binomial(m[f'heldout_pass_at_{k}_rl'], n)} |"
        )
    changes = [r["metrics"]["heldout_accuracy_rl"] - r["metrics"]["heldout_accuracy_sft"] for r in results]
    mean = statistics.fmean(changes)
    spread = f" ± {statistics.stdev(changes):.1%} over {len(changes)} seeds" if len(changes) > 1 else " (one seed)"
    se = math.sqrt(sum(r["metrics"]["heldout_accuracy_sft"] * (1 - r["metrics"]["heldout_accuracy_sft"]) for r in results)
                   / len(results) / n)
    verdict = (
        "a gain beyond the noise" if len(changes) > 1 and mean > 2 * statistics.stdev(changes) and mean > 2 * se
        else "no gain beyond the noise" if abs(mean) <= 2 * se or len(changes) < 2 else "a loss beyond the noise"
    )
    lines += ["", f"Held-out greedy accuracy, RL − SFT: {mean:+.1%}{spread} ({verdict}; one seed's binomial standard "
              f"error is ≈ {se:.1%} at n = {n})."]
    if plot_name:
        lines += ["", f"![GRPO probe]({plot_name})"]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Per seed: the weighted total reward and the correctness reward against the GRPO step, each ± its sd over the
    step's completions as a band."""
    fig, (total, correct) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for i, r in enumerate(results):
        steps = [s["step"] for s in r["steps"]]
        for ax, key in ((total, "reward"), (correct, "correct")):
            mean = [s.get(key, math.nan) for s in r["steps"]]
            sd = [s.get(f"{key}_std", 0.0) for s in r["steps"]]
            ax.plot(steps, mean, "o-", markersize=3, color=f"C{i}", label=f"seed {r['seed']}")
            ax.fill_between(steps, [m - d for m, d in zip(mean, sd, strict=True)], [m + d for m, d in zip(mean, sd, strict=True)],
                            color=f"C{i}", alpha=0.12, linewidth=0)
    total.set_ylabel("weighted total reward per completion")
    correct.set_ylabel("correctness reward (share of completions right)")
    for ax in (total, correct):
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("GRPO probe: mean over the step's completions, band ± their sd")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
