"""Reward-model stage (docs/paper.md, "Post-training": a reward model trained from the SFT checkpoint on preference
data; paper §5.2.1).

Model: the SFT network as DSV3ForSequenceClassification (num_labels = 1): the same weights plus a fresh linear
score read at the last token (the assistant turn's EOS). Loss: TRL's RewardTrainer, Bradley-Terry
−log σ(r_chosen − r_rejected), plus a small penalty on the mean reward so that scores stay centred.

Pairs, built from the verifiable problems (conversational, explicit prompt: {"prompt": [user],
"chosen": [assistant], "rejected": [assistant]}):
* chosen   = the worked solution (correct, well formed);
* rejected = the same solution with a wrong final answer ("wrong_answer"), with its \\boxed{} broken
  ("broken_format"), or an answer sampled from the SFT model that the rule judges wrong ("sft_sample").
Held-out pairs come the same way from held-out problems; pair accuracy (share of pairs with r_chosen > r_rejected)
is measured before and after training, overall and per kind of rejected answer.

Resumable: the pairs are written once to `pairs.json` (the SFT samples are not drawn again), checkpoints go to
`checkpoints/checkpoint-<step>`, and a rerun resumes from the last complete one. Output: `model/`
(save_pretrained + tokenizer). Metrics go to the stage's MLflow run through transformers' MLflowCallback.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer
from trl import RewardConfig, RewardTrainer

from dsv3.config import Recipe, RewardSection
from dsv3.data.chat import conversation
from dsv3.data.math_tasks import boxed_spans
from dsv3.eval.accuracy import answer_is_correct, generate_completions
from dsv3.eval.rewards import RewardModelScore
from dsv3.io import write_json_atomic
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
PAIRS = "pairs.json"
PLOT = "reward_training.png"
REJECTED_KINDS = ("wrong_answer", "broken_format", "sft_sample")


def run(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    cfg = check_recipe(recipe)
    sft_model = inputs["sft"] / OUTPUT
    if not (sft_model / "config.json").is_file():
        raise ValueError(f"no model at {sft_model}: run the pipeline up to sft first")
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    pairs = load_or_build_pairs(workdir / PAIRS, cfg, recipe.seed, sft_model, tokenizer)

    model = reward_model_from(sft_model)
    before = pair_accuracy(model, tokenizer, pairs["heldout"])
    trainer = RewardTrainer(
        model=model,
        args=reward_config(cfg, workdir / CHECKPOINTS, recipe.seed),
        train_dataset=datasets.Dataset.from_list(pairs["train"]),
        processing_class=tokenizer,
    )
    attach_logging(trainer, "reward")
    start = ResumeStep()
    trainer.add_callback(start)
    started = time.perf_counter()
    train(trainer, resume_checkpoint(workdir / CHECKPOINTS))
    train_seconds = time.perf_counter() - started
    save_model_folder(trainer.model, workdir / OUTPUT, tokenizer)
    after = pair_accuracy(trainer.model, tokenizer, pairs["heldout"])

    history = trainer.state.log_history
    losses = [r["loss"] for r in history if "loss" in r]
    plot_training(history, workdir / PLOT)
    metrics = {
        "train_loss_first": losses[0],
        "train_loss_final": losses[-1],
        "train_steps": trainer.state.global_step,
        "resumed_from_step": start.step,
        "train_seconds": train_seconds,
        "train_pairs": len(trainer.train_dataset),
        "heldout_pairs": len(pairs["heldout"]),
        "sft_samples_wrong_rate": pairs["sft_samples_wrong_rate"],
        **{f"heldout_pair_accuracy_before{suffix}": v for suffix, v in before.items()},
        **{f"heldout_pair_accuracy{suffix}": v for suffix, v in after.items()},
        NONFINITE: count_nonfinite(losses),
    }
    kinds = ", ".join(f"{k} {after[f'_{k}']:.0%}" for k in REJECTED_KINDS if f"_{k}" in after)
    summary = (
        f"Reward model on {metrics['train_pairs']} pairs ({metrics['train_steps']} steps, {train_seconds:.0f}s): "
        f"loss {losses[0]:.3f} → {losses[-1]:.3f}; held-out pair accuracy {before['']:.1%} → {after['']:.1%} "
        f"on {len(pairs['heldout'])} pairs ({kinds}); SFT samples judged wrong: "
        f"{pairs['sft_samples_wrong_rate']:.0%}."
    )
    data = {
        "pairs": StageData(datasets.Dataset.from_list(pairs["train"]), str(workdir / PAIRS)),
        "heldout_pairs": StageData(datasets.Dataset.from_list(pairs["heldout"]), str(workdir / PAIRS), "evaluation"),
    }
    return StageResult(outputs=[OUTPUT], metrics=metrics, artifacts=[PLOT], summary=summary, data=data)


class NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


NO_LOAD_REPORT = NoLoadReport()


def reward_model_from(sft_model: Path) -> DSV3ForSequenceClassification:
    """The SFT network under a fresh score head. transformers prints what that load does — LM head unused, score
    head new — as a warning table on every run: checked here instead, and anything else missing, left over or
    of another shape stops the stage."""
    logger = logging.getLogger("transformers.modeling_utils")  # not its level: transformers 5.24 runs a TP-plan
    logger.addFilter(NO_LOAD_REPORT)  # check (and warns of unsharded layers) only while that is WARNING or above
    try:
        model, info = DSV3ForSequenceClassification.from_pretrained(sft_model, num_labels=1, output_loading_info=True)
    finally:
        logger.removeFilter(NO_LOAD_REPORT)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("lm_head.")]
    if missing or unexpected or info["mismatched_keys"]:
        raise ValueError(
            f"{sft_model} is not the network the reward model starts from: missing {missing}, unexpected "
            f"{unexpected}, other shapes {[k for k, *_ in info['mismatched_keys']]}"
        )
    return model


def check_recipe(recipe: Recipe) -> RewardSection:
    if recipe.reward is None:
        raise ValueError(
            "recipe has no reward section: add one (see recipes/tiny.yaml) to run the reward stage"
        )
    return recipe.reward


# ------------------------------------------------------------------------------------------------- pairs


def wrong_answer(solution: str, answer: str, rng: random.Random) -> str:
    """The worked solution with its final \\boxed{} holding a different integer (off by 1 to 5)."""
    start, end = boxed_spans(solution)[-1]
    wrong = int(answer) + rng.choice([-5, -4, -3, -2, -1, 1, 2, 3, 4, 5])
    return f"{solution[:start]}\\boxed{{{wrong}}}{solution[end:]}"


def broken_format(solution: str, answer: str, rng: random.Random) -> str:
    """The worked solution, right answer, wrong format: no box, an unclosed box, or a second box."""
    start, end = boxed_spans(solution)[-1]
    head, tail = solution[:start], solution[end:]
    return rng.choice(
        [
            f"{head}{answer}{tail}",
            f"{head}\\boxed{{{answer}{tail}",
            f"{head}\\boxed{{{answer}}}{tail} Or \\boxed{{{answer}}}.",
        ]
    )


def preference_pairs(
    problems: list[dict], samples: list[list[str]], rng: random.Random
) -> tuple[list[dict], float]:
    """One synthetic pair per problem (wrong answer and broken format alternating) and one per SFT sample the rule
    judges wrong; `samples[i]` are the SFT answers to `problems[i]` (may be empty). Returns the pairs and the
    share of SFT samples judged wrong (0 when there are none)."""
    pairs, n_samples, n_wrong = [], 0, 0
    for i, problem in enumerate(problems):
        prompt = conversation(problem["prompt"])
        chosen = [{"role": "assistant", "content": problem["solution"]}]
        corrupt = (wrong_answer, broken_format)[i % 2]
        rejections = [(corrupt.__name__, corrupt(problem["solution"], problem["answer"], rng))]
        for sample in samples[i] if i < len(samples) else []:
            n_samples += 1
            if not answer_is_correct(sample, problem["answer"]):
                n_wrong += 1
                rejections.append(("sft_sample", sample))
        for kind, text in rejections:
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": [{"role": "assistant", "content": text}],
                    "kind": kind,
                }
            )
    return pairs, n_wrong / n_samples if n_samples else 0.0


def sample_answers(
    model_dir: Path, tokenizer, problems: list[dict], cfg: RewardSection, seed: int
) -> list[list[str]]:
    """`samples_per_problem` answers of the SFT model to each problem, drawn at `sample_temperature` under `seed`."""
    if not problems:
        return []
    model = DSV3ForCausalLM.from_pretrained(model_dir)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        texts, _ = generate_completions(
            model,
            tokenizer,
            [p["prompt"] for p in problems],
            cfg.max_new_tokens,
            cfg.sample_batch_size,
            cfg.samples_per_problem,
            cfg.sample_temperature,
        )
    return texts


def load_or_build_pairs(path: Path, cfg: RewardSection, seed: int, sft_model: Path, tokenizer) -> dict:
    """{"train": pairs, "heldout": pairs, "sft_samples_wrong_rate": float}, read from `path` when an earlier attempt
    wrote it, else built (sampling the SFT model) and written atomically."""
    if path.is_file():
        return json.loads(path.read_text())
    train_problems = recipe_problems(cfg, "train", seed)
    heldout_problems = recipe_problems(cfg, "heldout", seed)
    n_sampled = min(cfg.sampled_problems, cfg.train_problems)
    n_heldout_sampled = min(cfg.sampled_problems, cfg.heldout_problems)
    samples = sample_answers(sft_model, tokenizer, train_problems[:n_sampled], cfg, seed)
    heldout_samples = sample_answers(
        sft_model, tokenizer, heldout_problems[:n_heldout_sampled], cfg, seed + 1
    )
    rng = random.Random(f"reward-pairs:{seed}")
    train_pairs, wrong_rate = preference_pairs(train_problems, samples, rng)
    heldout_pairs, _ = preference_pairs(heldout_problems, heldout_samples, rng)
    pairs = {"train": train_pairs, "heldout": heldout_pairs, "sft_samples_wrong_rate": wrong_rate}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, pairs)
    return pairs


# ------------------------------------------------------------------------------------- training, scoring


def reward_config(cfg: RewardSection, output_dir: Path, seed: int) -> RewardConfig:
    """TRL settings: Bradley-Terry on conversational pairs, linear LR decay, fp32, checkpoints, MLflow."""
    return RewardConfig(
        **shared_arguments("reward", output_dir, seed, cfg.save_steps, cfg.log_steps),
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        activation_checkpointing=False,
        bf16=False,
    )


def pair_accuracy(model, tokenizer, pairs: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Share of pairs whose chosen answer scores above the rejected one: {"": overall, "_<kind>": per kind}."""
    score = RewardModelScore(model, tokenizer, batch_size)
    prompts = [p["prompt"] for p in pairs]
    chosen = score(prompts, [p["chosen"] for p in pairs])
    rejected = score(prompts, [p["rejected"] for p in pairs])
    wins: dict[str, list[bool]] = defaultdict(list)
    for pair, c, r in zip(pairs, chosen, rejected, strict=True):
        wins[""].append(c > r)
        wins[f"_{pair['kind']}"].append(c > r)
    return {key: sum(v) / len(v) for key, v in wins.items()}


def plot_training(history: list[dict], path: Path) -> Path:
    """Bradley-Terry loss and training pair accuracy against optimizer steps."""
    points = [(r["step"], r["loss"], r.get("accuracy", float("nan"))) for r in history if "loss" in r]
    steps, losses, accuracies = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, losses, marker="o", markersize=3, label="loss −log σ(r_chosen − r_rejected)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/pair)")
    ax.grid(alpha=0.3)
    acc_ax = ax.twinx()
    acc_ax.plot(steps, accuracies, color="tab:green", linestyle="--", label="train pair accuracy")
    acc_ax.set_ylabel("pair accuracy")
    acc_ax.set_ylim(0, 1.05)
    lines = ax.get_lines() + acc_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right")
    ax.set_title("Reward model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


STAGE = Stage(
    name="reward",
    run=run,
    sections=("reward",),
    inputs=("sft",),
    outputs=(OUTPUT,),
    checks={
        "min_pair_accuracy": metric("heldout_pair_accuracy"),
        "min_broken_format_accuracy": metric("heldout_pair_accuracy_broken_format"),
    },
    headline=("heldout_pair_accuracy", "heldout_pair_accuracy_before", "train_loss_final"),
)  # fmt: skip
