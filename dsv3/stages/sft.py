"""Supervised fine-tuning stage (docs/paper.md, "Post-training": 2 epochs, cosine LR 5e-6 → 1e-6, sample masking).

Data: generated math problems with worked solutions ending in \\boxed{answer} (dsv3.data.math_tasks), plus the
chat files the recipe names, as conversations in the tokenizer's chat template. TRL's SFTTrainer packs them
padding-free (best-fit decreasing into rows of max_seq_len tokens; a batch is one row with position_ids that
restart at every sample); DSV3ForCausalLM builds the block-diagonal attention mask from those restarts, so
packed samples cannot see each other. The loss covers assistant tokens only (the template's {% generation %}
span: the answer and its EOS). LR: linear warm-up, then cosine from lr_peak down to lr_final
("cosine_with_min_lr"). MTP modules are carried along untrained and the router biases stay as pretraining left
them. Metrics go to the stage's MLflow run through transformers' MLflowCallback (the runner points
MLFLOW_RUN_ID at it).

Checkpoints: `checkpoints/checkpoint-<step>` every save_steps; a rerun of a killed stage resumes from the last
complete one (weights, optimizer, scheduler, RNG, data position). Output: `model/` — save_pretrained plus the
tokenizer files. Metrics: final training loss, greedy accuracy and format rate on held-out problems, mean
completion length, training time. Artifact: the loss curve.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from dsv3.config import Recipe, SftSection
from dsv3.data.chat import check_messages, format_conversation
from dsv3.data.math_tasks import sft_example
from dsv3.eval.accuracy import evaluate_accuracy
from dsv3.model import DSV3ForCausalLM
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
LOSS_PLOT = "sft_loss.png"


def data_files(recipe: Recipe) -> list[str]:
    """The chat files (their content is part of the stage's key)."""
    return list(recipe.sft.chat_data) if recipe.sft else []


def inputs(recipe: Recipe) -> tuple[str, ...]:
    """The context-extended model when the pipeline extends, else the pretrained one."""
    return ("extend",) if "extend" in recipe.pipeline.stages else ("pretrain",)


def run(recipe: Recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    cfg = check_recipe(recipe)
    ((upstream, folder),) = inputs.items()
    model, tokenizer = load_model(folder / OUTPUT, upstream)
    rows, dropped = sft_dataset(cfg, recipe.seed, tokenizer)
    trainer = build_trainer(model, tokenizer, rows, cfg, workdir / CHECKPOINTS, recipe.seed)
    attach_logging(trainer, "sft")
    start = ResumeStep()
    trainer.add_callback(start)
    checkpoint = resume_checkpoint(workdir / CHECKPOINTS)
    started = time.perf_counter()
    train(trainer, checkpoint)
    train_seconds = time.perf_counter() - started
    save_model_folder(trainer.model, workdir / OUTPUT, tokenizer)

    heldout = recipe_problems(cfg, "heldout", recipe.seed)
    started = time.perf_counter()
    scores = evaluate_accuracy(
        trainer.model, tokenizer, heldout, cfg.eval_max_new_tokens, cfg.eval_batch_size
    )
    eval_seconds = time.perf_counter() - started

    history = trainer.state.log_history
    losses = [r["loss"] for r in history if "loss" in r]
    accuracies = [r["mean_token_accuracy"] for r in history if "mean_token_accuracy" in r]
    plot_loss(history, workdir / LOSS_PLOT)
    metrics = {
        "train_loss_first": losses[0],
        "train_loss_final": losses[-1],
        "train_token_accuracy_final": accuracies[-1],
        "train_steps": trainer.state.global_step,
        "resumed_from_step": start.step,
        "train_seconds": train_seconds,
        "train_samples": len(rows),
        "dropped_long_samples": dropped,
        "packed_rows": len(trainer.train_dataset),
        "heldout_accuracy": scores["accuracy"],
        "heldout_format_rate": scores["format_rate"],
        "heldout_mean_completion_tokens": scores["mean_completion_tokens"],
        "heldout_truncated_rate": scores["truncated_rate"],
        "eval_seconds": eval_seconds,
        NONFINITE: count_nonfinite(losses),
    }
    summary = (
        f"SFT on {len(rows)} conversations ({metrics['packed_rows']} packed rows, {cfg.epochs} epochs, "
        f"{metrics['train_steps']} steps) in {train_seconds:.0f}s: loss {losses[0]:.3f} → {losses[-1]:.3f}; "
        f"held-out greedy accuracy {scores['accuracy']:.1%}, format rate {scores['format_rate']:.1%}, "
        f"{scores['mean_completion_tokens']:.0f} tokens per answer ({scores['truncated_rate']:.0%} at the "
        f"{cfg.eval_max_new_tokens}-token limit) on {len(heldout)} problems."
    )
    source = "dsv3.data.math_tasks.sft_example" + "".join(f" + {path}" for path in cfg.chat_data)
    data = {"conversations": StageData(rows, source)}
    return StageResult(outputs=[OUTPUT], metrics=metrics, artifacts=[LOSS_PLOT], summary=summary, data=data)


def check_recipe(recipe: Recipe) -> SftSection:
    if recipe.sft is None:
        raise ValueError("recipe has no sft section: add one (see recipes/tiny.yaml) to run the sft stage")
    return recipe.sft


def load_model(folder: Path, upstream: str) -> tuple[DSV3ForCausalLM, PreTrainedTokenizerBase]:
    """The upstream stage's save_pretrained directory: model and chat tokenizer."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"no model at {folder}: run the pipeline up to {upstream} first")
    return DSV3ForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def read_chat_data(path: str | Path) -> list[dict]:
    """Rows {"messages": [...]} of a jsonl file; a one-line ValueError names the file and line of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f'sft.chat_data: no file {path} (name local jsonl files of {{"messages": [...]}} rows)'
        )
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            check_messages(messages)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f'sft.chat_data: {path}:{number} is not a {{"messages": [...]}} row: {err}'
            ) from None
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"sft.chat_data: {path}:{number} has no assistant message to train on")
        rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
    return rows


def sft_dataset(cfg: SftSection, seed: int, tokenizer) -> tuple[datasets.Dataset, int]:
    """Conversations {"messages"}: worked solutions of generated train problems, then the chat files; samples
    longer than max_seq_len tokens (which packing would truncate, cutting off the answer) are left out.
    Returns the dataset and the number left out."""
    problems = recipe_problems(cfg, "train", seed)
    rows = [sft_example(p) for p in problems]
    for path in cfg.chat_data:
        rows += read_chat_data(path)
    texts = [format_conversation(r["messages"]) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    kept = [r for r, n in zip(rows, lengths, strict=True) if n <= cfg.max_seq_len]
    if not kept:
        raise ValueError(
            f"sft.max_seq_len: every SFT sample is longer than {cfg.max_seq_len} tokens; raise it"
        )
    return datasets.Dataset.from_list(kept), len(rows) - len(kept)


def sft_config(cfg: SftSection, output_dir: Path, seed: int) -> SFTConfig:
    """TRL settings: padding-free packing, assistant-only loss, cosine to a floor, checkpoints, MLflow."""
    return SFTConfig(
        **shared_arguments("sft", output_dir, seed, cfg.save_steps, cfg.log_steps),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.lr_peak,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": cfg.lr_final / cfg.lr_peak if cfg.lr_peak else 0.0},  # lr_peak 0: evaluate
        warmup_steps=cfg.lr_warmup_fraction,  # a float below 1 is a fraction of the steps
        max_length=cfg.max_seq_len,
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
        bf16=cfg.bf16,
        activation_checkpointing=cfg.activation_checkpointing,
    )


def build_trainer(
    model: DSV3ForCausalLM, tokenizer, rows: datasets.Dataset, cfg: SftSection, output_dir: Path, seed: int
) -> SFTTrainer:
    return SFTTrainer(
        model=model, args=sft_config(cfg, output_dir, seed), train_dataset=rows, processing_class=tokenizer
    )


def plot_loss(history: list[dict], path: Path) -> Path:
    """Training loss (assistant tokens, nats/token) and learning rate against optimizer steps."""
    points = [(r["step"], r["loss"], r["learning_rate"]) for r in history if "loss" in r]
    steps, losses, lrs = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, losses, marker="o", markersize=3, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on assistant tokens (nats/token)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, lrs, color="grey", linestyle="--", label="learning rate")
    lr_ax.set_ylabel("learning rate")
    ax.set_title("SFT")
    lines = ax.get_lines() + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


STAGE = Stage(
    name="sft",
    run=run,
    sections=("sft",),
    inputs=inputs,
    outputs=(OUTPUT,),
    checks={
        "min_accuracy": metric("heldout_accuracy"),
        "min_format_rate": metric("heldout_format_rate"),
        "max_truncated_rate": metric("heldout_truncated_rate"),
    },
    headline=("heldout_accuracy", "heldout_format_rate", "heldout_mean_completion_tokens", "heldout_truncated_rate", "train_loss_final"),
    data_files=data_files,
)  # fmt: skip
