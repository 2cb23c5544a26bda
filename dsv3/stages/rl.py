"""GRPO stage (docs/paper.md, "Post-training"; paper §5.2.2, DeepSeekMath's Group Relative Policy Optimization).

For each prompt q the policy samples a group of G answers o_1..o_G; each gets the weighted sum of the rewards
r_i = w_c·correct(o_i) + w_f·well_formed(o_i) + w_rm·RM(q, o_i)   (dsv3.eval.rewards), and the advantage
A_i = (r_i − mean(r)) / std(r) over its group. The policy maximises, per token, the clipped ratio objective
min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), ρ = π_θ/π_θold, minus β·D_KL with the k3 estimator
π_ref/π_θ − log(π_ref/π_θ) − 1 against the reference π_ref = the SFT model, averaged over each answer's tokens
then over answers (loss_type "grpo"). TRL's GRPOTrainer implements exactly this; the stage wires it: policy and
reference from `sft/model` (TRL reloads the reference by its path), the reward model from `reward/model`,
conversational prompts in the chat template (TRL left-pads them), reward weights and every coefficient from
the recipe. Each step logs to MLflow the total reward, each reward separately, the KL, the clip ratios and the
completion lengths.

Evaluation: held-out problems (never trained on) answered by the SFT model and by the RL model: greedy accuracy,
pass@k from k samples, format rate, mean completion length, side by side.

Resumable: checkpoints in `checkpoints/checkpoint-<step>`; a rerun resumes from the last complete one. Output:
`model/` (save_pretrained + tokenizer). Artifact: the reward curve.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import datasets
import numpy as np
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from dsv3.config import Recipe, RlSection
from dsv3.data.math_tasks import rl_example
from dsv3.eval.accuracy import evaluate_accuracy
from dsv3.eval.rewards import RewardModelScore, correctness_reward, format_reward
from dsv3.model import DSV3ForCausalLM, DSV3ForSequenceClassification
from dsv3.model.hf import save_model_folder
from dsv3.plotting import plt
from dsv3.stages.post_training import (
    ResumeStep,
    attach_logging,
    recipe_problems,
    resume_checkpoint,
    shared_arguments,
    train,
)
from dsv3.store import Stage, StageData, StageResult, metric
from dsv3.store.health import NONFINITE, count_nonfinite

OUTPUT = "model"
CHECKPOINTS = "checkpoints"
PLOT = "rl_rewards.png"
REWARD_NAMES = ("correctness_reward", "format_reward", "reward_model")


def run(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    cfg = check_recipe(recipe)
    sft_dir, rm_dir = model_dir(inputs["sft"], "sft"), model_dir(inputs["reward"], "reward")
    policy = DSV3ForCausalLM.from_pretrained(sft_dir)  # its path is where TRL reloads the reference from
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="left")
    reward_model = DSV3ForSequenceClassification.from_pretrained(rm_dir)
    trainer = build_trainer(
        policy, tokenizer, reward_model, AutoTokenizer.from_pretrained(rm_dir), cfg, workdir, recipe.seed
    )
    attach_logging(trainer, "rl")
    start = ResumeStep()
    trainer.add_callback(start)
    started = time.perf_counter()
    train(trainer, resume_checkpoint(workdir / CHECKPOINTS))
    train_seconds = time.perf_counter() - started
    save_model_folder(trainer.model, workdir / OUTPUT, tokenizer)

    heldout = recipe_problems(cfg, "heldout", recipe.seed)
    started = time.perf_counter()
    scores = {
        "sft": evaluate(DSV3ForCausalLM.from_pretrained(sft_dir), tokenizer, heldout, cfg, recipe.seed),
        "rl": evaluate(trainer.model, tokenizer, heldout, cfg, recipe.seed),
    }
    eval_seconds = time.perf_counter() - started

    history = trainer.state.log_history
    plot_rewards(history, workdir / PLOT, cfg.max_completion_length)
    logged = [r for r in history if "reward" in r]
    metrics = {
        "train_steps": trainer.state.global_step,
        "resumed_from_step": start.step,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "reward_first": logged[0]["reward"],
        "reward_final": logged[-1]["reward"],
        "kl_final": logged[-1].get("kl", 0.0),
        "rollout_truncated_rate": float(np.mean([r.get("completions/clipped_ratio", 0.0) for r in logged])),
        **{f"heldout_{name}_{model}": value for model, s in scores.items() for name, value in s.items()},
        NONFINITE: count_nonfinite(r[k] for r in history for k in ("loss", "kl", "reward") if k in r),
    }
    return StageResult(
        outputs=[OUTPUT],
        metrics=metrics,
        artifacts=[PLOT],
        summary=summary(cfg, metrics, scores, len(heldout)),
        data={"prompts": StageData(trainer.train_dataset, "dsv3.data.math_tasks.rl_example")},
    )


def check_recipe(recipe: Recipe) -> RlSection:
    if recipe.rl is None:
        raise ValueError("recipe has no rl section: add one (see recipes/tiny.yaml) to run the rl stage")
    return recipe.rl


def model_dir(stage_dir: Path, stage: str) -> Path:
    folder = stage_dir / OUTPUT
    if not (folder / "config.json").is_file():
        raise ValueError(f"no model at {folder}: run the pipeline up to {stage} first")
    return folder


def grpo_config(cfg: RlSection, output_dir: Path, seed: int) -> GRPOConfig:
    """TRL settings: G completions per prompt, `prompts_per_step` prompts per optimizer step, one generation per
    step, the paper's loss ("grpo": per-answer token mean), k3 KL with β, clip ε, constant LR, fp32."""
    return GRPOConfig(
        **shared_arguments("rl", output_dir, seed, cfg.save_steps, cfg.log_steps),
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,  # completions per step
        gradient_accumulation_steps=1,
        num_generations=cfg.num_generations,
        num_iterations=cfg.num_iterations,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        max_completion_length=cfg.max_completion_length,
        reward_weights=[cfg.correctness_weight, cfg.format_weight, cfg.reward_model_weight],
        disable_dropout=True,
        activation_checkpointing=False,
        bf16=False,
    )


def build_trainer(
    policy, tokenizer, reward_model, reward_tokenizer, cfg: RlSection, workdir: Path, seed: int
) -> GRPOTrainer:
    """GRPOTrainer on conversational prompts of generated train problems; rewards in REWARD_NAMES order."""
    # TRL 1.16 reads model.is_gradient_checkpointing at every generation, deprecated in transformers 5.24
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    problems = recipe_problems(cfg, "train", seed)
    args = grpo_config(cfg, workdir / CHECKPOINTS, seed)
    reward_model.to(args.device)
    return GRPOTrainer(
        model=policy,
        reward_funcs=[correctness_reward, format_reward, RewardModelScore(reward_model, reward_tokenizer)],
        args=args,
        train_dataset=datasets.Dataset.from_list([rl_example(p) for p in problems]),
        processing_class=tokenizer,
    )


def evaluate(model, tokenizer, problems: list[dict], cfg: RlSection, seed: int) -> dict[str, float]:
    """Greedy accuracy, format rate and mean completion length, and pass@k from k samples at eval_temperature."""
    greedy = evaluate_accuracy(model, tokenizer, problems, cfg.eval_max_new_tokens, cfg.eval_batch_size)
    sampled = evaluate_accuracy(
        model,
        tokenizer,
        problems,
        cfg.eval_max_new_tokens,
        cfg.eval_batch_size,
        k=cfg.eval_k,
        temperature=cfg.eval_temperature,
        seed=seed,
    )
    return {
        "accuracy": greedy["accuracy"],
        f"pass_at_{cfg.eval_k}": sampled["pass_at_k"],
        "format_rate": greedy["format_rate"],
        "mean_completion_tokens": greedy["mean_completion_tokens"],
        "truncated_rate": greedy["truncated_rate"],
    }


def summary(cfg: RlSection, metrics: dict, scores: dict[str, dict[str, float]], n_heldout: int) -> str:
    """One line on the training, then the SFT-vs-RL table on the held-out problems (markdown)."""
    rows = [
        ("greedy accuracy", "accuracy", "{:.1%}"),
        (f"pass@{cfg.eval_k} (T={cfg.eval_temperature:g})", f"pass_at_{cfg.eval_k}", "{:.1%}"),
        ("format rate", "format_rate", "{:.1%}"),
        ("mean completion tokens", "mean_completion_tokens", "{:.1f}"),
    ]
    table = ["| held-out metric | SFT | RL |", "|---|---|---|"] + [
        f"| {label} | {fmt.format(scores['sft'][key])} | {fmt.format(scores['rl'][key])} |"
        for label, key, fmt in rows
    ]
    head = (
        f"GRPO for {metrics['train_steps']} steps (G={cfg.num_generations}, {cfg.prompts_per_step} prompts/step, "
        f"β={cfg.beta:g}, ε={cfg.epsilon:g}, loss {cfg.loss_type}) in {metrics['train_seconds']:.0f}s: "
        f"reward {metrics['reward_first']:.3f} → {metrics['reward_final']:.3f}, final KL {metrics['kl_final']:.4f}. "
        f"On {n_heldout} held-out problems:"
    )
    return "\n".join([head, "", *table])


def plot_rewards(history: list[dict], path: Path, max_length: int) -> Path:
    """Three panels against optimizer steps: the weighted total reward; each reward's mean (own markers, so that
    equal curves stay visible); the KL to the SFT model with the mean completion length on 0..max_length."""
    rows = [r for r in history if "reward" in r]
    steps = [r["step"] for r in rows]
    fig, (total, parts, bottom) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    total.plot(steps, [r["reward"] for r in rows], marker="o", markersize=3, color="black", label="weighted total")
    total.set_ylabel("reward per completion")
    total.set_title("GRPO")
    total.grid(alpha=0.3)
    total.legend(loc="best", fontsize=8)
    for name, marker, style in zip(REWARD_NAMES, "os^", ("-", "--", ":"), strict=True):
        values = [r.get(f"rewards/{name}/mean", float("nan")) for r in rows]
        parts.plot(steps, values, marker=marker, markersize=4, linestyle=style, label=f"{name} (unweighted)")
    parts.set_ylabel("mean of each reward")
    parts.grid(alpha=0.3)
    parts.legend(loc="best", fontsize=8)
    bottom.plot(steps, [r.get("kl", float("nan")) for r in rows], color="tab:red", label="KL to SFT (k3)")
    bottom.set_ylabel("KL (nats/token)")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    length_ax = bottom.twinx()
    length_ax.plot(
        steps,
        [r.get("completions/mean_length", float("nan")) for r in rows],
        color="grey",
        linestyle="--",
        label="mean completion length",
    )
    length_ax.set_ylim(0, max_length * 1.05)
    length_ax.axhline(max_length, color="grey", linewidth=0.8, linestyle=":", label="length limit")
    length_ax.set_ylabel("tokens")
    lines = bottom.get_lines() + length_ax.get_lines()
    bottom.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


STAGE = Stage(
    name="rl",
    run=run,
    sections=("rl",),
    inputs=("sft", "reward"),
    outputs=(OUTPUT,),
    checks={"max_truncated_rate": metric("rollout_truncated_rate")},
    headline=("heldout_accuracy_sft", "heldout_accuracy_rl", "heldout_format_rate_rl", "reward_first", "reward_final", "kl_final", "rollout_truncated_rate"),
)  # fmt: skip
