"""What the three post-training stages (sft, reward, rl) share: their problem sets, the transformers Trainer
settings they have in common, and the checkpoint / resume / save plumbing around `Trainer.train`.

Checkpoints are `checkpoint-<step>` folders written every save_steps (the last two kept); a rerun of a killed
stage resumes from the newest complete one (weights, optimizer, scheduler, RNG, data position). They keep no
`training_args.bin` (a pickle naming the absolute output folder, which resuming does not read): a moved runs folder
names nowhere else. Metrics go to
the stage's MLflow run through transformers' MLflowCallback (the runner points MLFLOW_RUN_ID at it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Trainer, TrainerCallback
from transformers.integrations import MLflowCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dsv3.config import ProblemsSection
from dsv3.data.math_tasks import generate_problems
from dsv3.io import set_aside
from dsv3.tracking import stage_run

PROGRESS = logging.getLogger("dsv3.train")


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
        "report_to": [],  # MLflow through MLflowUnderTrain (attach_logging), progress through ProgressLog
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.accelerator.is_available(),  # else torch warns at every epoch's loader
    }


class MLflowUnderTrain(MLflowCallback):
    """transformers' MLflow callback with every metric under `train/`, as the training loop names its own (TRL
    logs `loss`, `entropy`, `epoch`, ... unprefixed), and without the params that are absolute paths of this machine
    (the Trainer's output_dir, the model's _name_or_path): the stage run's dsv3.output_dir tag says where it wrote,
    relative to the runs folder, which may move."""

    def __init__(self):
        super().__init__()
        self._ml_flow = _ParamsWithoutPaths(self._ml_flow)

    def on_log(self, args, state, control, logs, model=None, **kwargs):
        super().on_log(args, state, control, {f"train/{k}": v for k, v in logs.items()}, model=model, **kwargs)


class _ParamsWithoutPaths:
    """The mlflow module as MLflowCallback calls it, its log_params leaving out absolute paths."""

    def __init__(self, mlflow):
        self._mlflow = mlflow

    def __getattr__(self, name: str):
        return getattr(self._mlflow, name)

    def log_params(self, params: dict, **kwargs):
        kept = {k: v for k, v in params.items() if not (isinstance(v, str) and os.path.isabs(v))}
        return self._mlflow.log_params(kept, **kwargs)


class ProgressLog(TrainerCallback):
    """One line per logging step on the `dsv3.train` logger: what Prefect shows in the flow run's logs."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = ", ".join(f"{k} {v:.4g}" for k, v in (logs or {}).items() if isinstance(v, int | float))
        PROGRESS.info("%s step %d/%d: %s", self.stage, state.global_step, state.max_steps, shown)


class ProgressBar(ProgressCallback):
    """transformers' progress bar without the log dicts it prints: ProgressLog logs each step once."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def attach_logging(trainer: Trainer, stage: str) -> Trainer:
    """Progress lines always; metrics into the stage's MLflow run when one is open (dsv3.tracking.stage_run)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ProgressBar)
    trainer.add_callback(ProgressLog(stage))
    if stage_run():
        trainer.add_callback(MLflowUnderTrain())
    return trainer


class ResumeStep(TrainerCallback):
    """The optimizer step training starts from: 0 on a fresh run, the checkpoint's step when resuming."""

    step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def checkpoints_newest_first(folder: Path) -> list[Path]:
    steps = {
        int(p.name.removeprefix("checkpoint-")): p
        for p in folder.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit()
    }
    return [steps[step] for step in sorted(steps, reverse=True)]


def last_checkpoint(folder: Path) -> Path | None:
    """The newest readable `checkpoint-<step>` (see checkpoint_problem), or None; touches nothing."""
    return next((c for c in checkpoints_newest_first(folder) if checkpoint_problem(c) is None), None)


def resume_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a rerun resumes from: the newest readable one. Newer ones that are unreadable — cut short by
    a kill, truncated, not loadable with weights_only — are set aside as `checkpoint-<step>.corrupt-<time>` (never
    deleted), and the run says so."""
    for checkpoint in checkpoints_newest_first(folder):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        set_aside(checkpoint, problem)
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from, or None when every file in it reads back."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        for weights in checkpoint.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        with safe_globals():  # the numpy types the Trainer's RNG state holds, as the Trainer allows them
            for state in (*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")):
                torch.load(state, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - whatever makes it unreadable, it is set aside the same way
        return str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    return None


class WithoutPickledArguments(TrainerCallback):
    """Removes the `training_args.bin` the Trainer writes into each checkpoint: a pickle of the TrainingArguments
    (absolute output_dir included) that resuming never reads, and that nothing here may unpickle."""

    def on_save(self, args, state, control, **kwargs):
        for pickled in Path(args.output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*/{TRAINING_ARGS_NAME}"):
            pickled.unlink(missing_ok=True)


def train(trainer: Trainer, checkpoint: Path | None) -> None:
    """trainer.train, resuming from `checkpoint`; on failure, close the MLflow run the MLflowCallback resumed so
    that a retry in the same process can start its own."""
    trainer.add_callback(WithoutPickledArguments)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException:
        if stage_run():
            import mlflow

            mlflow.end_run(status="FAILED")
        raise
