"""What the three post-training stages (sft, reward, rl) share: their problem sets, the transformers Trainer
settings they have in common, and the checkpoint / resume / save plumbing around `Trainer.train`.

Checkpoints are `checkpoint-<step>` folders written every save_steps (the last two kept); a rerun of a killed
stage resumes from the newest complete one (weights, optimizer, scheduler, RNG, data position). Metrics go to
the stage's MLflow run through transformers' MLflowCallback (the runner points MLFLOW_RUN_ID at it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import PreTrainedModel, Trainer, TrainerCallback

from dsv3.config import ProblemsSection
from dsv3.data.math_tasks import generate_problems
from dsv3.tracking import stage_run


def recipe_problems(cfg: ProblemsSection, split: str, seed: int) -> list[dict]:
    """A post-training section's generated math problems of one split ("train" | "heldout"), at its difficulty."""
    n = cfg.train_problems if split == "train" else cfg.heldout_problems
    return generate_problems(n, split, seed, cfg.problem_steps, cfg.max_operand, tuple(cfg.problem_kinds))


def shared_arguments(stage: str, output_dir: Path, seed: int, save_steps: int, log_steps: int) -> dict:
    """TrainingArguments every post-training stage sets alike: seeds, checkpoints, logging, MLflow, no workers."""
    return {
        "output_dir": str(output_dir),
        "run_name": stage,
        "seed": seed,
        "data_seed": seed,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": 2,
        "logging_steps": log_steps,
        "logging_first_step": True,
        "report_to": ["mlflow"] if stage_run() else [],
        "dataloader_num_workers": 0,
    }


class ResumeStep(TrainerCallback):
    """The optimizer step training starts from: 0 on a fresh run, the checkpoint's step when resuming."""

    step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def last_checkpoint(folder: Path) -> Path | None:
    """The newest `checkpoint-<step>` whose trainer_state.json (written last) is complete, or None."""
    steps = {
        int(p.name.removeprefix("checkpoint-")): p
        for p in folder.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit()
    }
    for _, checkpoint in sorted(steps.items(), reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return checkpoint
    return None


def train(trainer: Trainer, checkpoint: Path | None) -> None:
    """trainer.train, resuming from `checkpoint`; on failure, close the MLflow run the MLflowCallback resumed so
    that a retry in the same process can start its own."""
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException:
        if stage_run():
            import mlflow

            mlflow.end_run(status="FAILED")
        raise


def save_model(model: PreTrainedModel, tokenizer, out: Path) -> None:
    """save_pretrained (safetensors) plus the tokenizer, written to a sibling folder and renamed."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
