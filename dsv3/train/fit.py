"""`fit`: one training run of the loop — pretraining, or one extension phase — from settings, a model config and
packed rows to a trained model, resumable at every checkpoint.

It builds the Lightning Trainer (steps, validation interval, atomic checkpoints, the FP8 plugin, DDP over
torchrun ranks), resumes from the folder's newest readable checkpoint, trains, validates once more at the end and
saves the model. Ctrl-C (or SIGTERM) ends it with KeyboardInterrupt — Lightning's own handling would turn it
into `exit(1)` and leave Ctrl-C ignored — and a diverged loss with TrainingDiverged, the last checkpoint intact.
With `settings.deterministic`, torch's deterministic algorithms are on while it runs: the same seed and thread
count give bit-identical losses and weights.
"""

from __future__ import annotations

import logging
import signal
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dsv3.fp8 import FP8BlockwisePrecision, fp8_scaling
from dsv3.model import DSV3Config, DSV3ForCausalLM
from dsv3.model.hf import save_model_folder
from dsv3.train.checkpoints import AtomicCheckpointIO, PortableModelCheckpoint, resume_point
from dsv3.train.data import PackedRowsData
from dsv3.train.launch import join_attempt_process_group
from dsv3.train.module import CausalLMTraining
from dsv3.train.schedules import step_plan
from dsv3.train.settings import LoopSettings
from dsv3.train.strategy import ShardedStrategy

CHECKPOINTS = "checkpoints"


@dataclass
class FitResult:
    """What a run of the loop leaves: the trained model, its metric history (train/..., val/... per step), the
    validation expert load (G, E) of the final validation, and where it resumed from."""

    model: DSV3ForCausalLM
    history: list[dict[str, float]]
    val_expert_load: torch.Tensor | None
    resumed_from_step: int
    steps: int
    tokens: int
    rank: int


def fit(
    settings: LoopSettings,
    config: DSV3Config,
    train_rows: datasets.Dataset,
    val_rows: datasets.Dataset,
    folder: Path,
    seed: int,
    token_bytes: torch.Tensor,
    save_to: Path,
    tokenizer_files: Path,
    *,
    initial_weights: dict[str, torch.Tensor] | None = None,
    step_offset: int = 0,
    keep_best: bool = False,
    rows_in_order: bool = False,
    logger=False,
) -> FitResult:
    """Train `config` (or `initial_weights` loaded into it) on packed rows for the settings' steps, resuming from
    `folder/checkpoints/`; rank 0 saves the model with the files of `tokenizer_files` to `save_to`.

    seed: the initialisation and the data order. step_offset: added to every recorded step (extension phases).
    keep_best: also keep checkpoints/best.ckpt at the lowest validation loss. rows_in_order: `train_rows` are the
    run's rows in training order (a data mixture's blend), read as given instead of shuffled per epoch.
    logger: a Lightning logger or False."""
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")  # we want post-step
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")  # resuming
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")  # val/loss is summed over the ranks already
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning 2.6 on torch 2.13
    seq_len = train_rows.features["input_ids"].length
    if seq_len < 1:
        raise ValueError("fit: the rows' input_ids feature has no fixed length; build the dataset with a fixed-length List feature")
    plan = step_plan(settings, seq_len)
    torch.manual_seed(seed)
    module = CausalLMTraining(config, settings, plan, token_bytes, step_offset)
    if initial_weights is not None:
        module.model.load_state_dict(initial_weights)
    data = PackedRowsData(train_rows, val_rows, settings, plan, seed, rows_in_order)
    checkpoints = Path(folder) / CHECKPOINTS
    interrupts = InterruptRecorder()
    callbacks = [
        PortableModelCheckpoint(dirpath=checkpoints, save_top_k=0, save_last=True, every_n_train_steps=settings.checkpoint_every_n_steps),
        StepProgressBar(refresh_rate=module.accumulation),
        interrupts,
    ]
    if keep_best:
        callbacks.append(
            PortableModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1, auto_insert_metric_name=False)
        )
    join_attempt_process_group("gloo" if accelerator(settings) == "cpu" else "nccl")  # a torchrun restart's own
    trainer = build_trainer(settings, folder, plan.steps, module.accumulation, callbacks, logger)
    last, resumed_from = resume_point(checkpoints)
    with deterministic_algorithms(settings.deterministic), interrupts.raised():
        trainer.fit(module, datamodule=data, ckpt_path=last, weights_only=True)
        trainer.validate(module, datamodule=data, verbose=False)
    model = gathered(module.model, config) if module.sharded else module.model
    if trainer.is_global_zero:
        save_model_folder(model, save_to, tokenizer_files)
    trainer.strategy.barrier("model-saved")  # the next phase's ranks load it
    return FitResult(model, module.history, module.val_expert_load, resumed_from, plan.steps, plan.total_tokens, trainer.global_rank)


def gathered(model: DSV3ForCausalLM, config: DSV3Config) -> DSV3ForCausalLM:
    """The sharded model's full weights in a plain DSV3ForCausalLM on rank 0 (a collective: every rank calls it;
    the others get their sharded model back)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return model
    plain = DSV3ForCausalLM(config)
    plain.load_state_dict(full)
    return plain


def accelerator(settings: LoopSettings) -> str:
    """settings.accelerator, with "auto" meaning a GPU when there is one."""
    return settings.accelerator if settings.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")


class NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip" records: each Trainer advertises litlogger / litmodels once it is built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


NO_TIPS = NoTips()


def build_trainer(
    settings: LoopSettings, folder: Path, steps: int, accumulation: int, callbacks: list, logger
) -> L.Trainer:
    """`steps` optimizer steps, validation every val_every_n_steps, atomic checkpoints, the FP8 plugin when asked
    for, DDP (gloo on CPUs, NCCL on GPUs) when the settings span several processes."""
    device = accelerator(settings)
    backend = "gloo" if device == "cpu" else "nccl"
    fp8 = fp8_scaling(settings.precision)  # blockwise, tensorwise or None
    precision = None if fp8 else settings.precision
    if settings.strategy == "fsdp":
        strategy = ShardedStrategy(settings.world_size, backend)
        if device == "gpu" and precision == "bf16-mixed":
            precision = "32-true"  # FSDP2's policy computes in bf16 and reduces in fp32 (dsv3.train.parallel)
    elif settings.world_size > 1:
        strategy = DDPStrategy(process_group_backend=backend, broadcast_buffers=False)
    else:
        strategy = "auto"
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NO_TIPS)
    return L.Trainer(
        accelerator=device,
        devices=settings.devices,
        num_nodes=settings.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=steps,
        val_check_interval=settings.val_every_n_steps * accumulation,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()] + ([FP8BlockwisePrecision(settings.fp8_backend, device="cuda" if device == "gpu" else "cpu", scaling=fp8)] if fp8 else []),
        default_root_dir=folder,
        enable_model_summary=False,
        log_every_n_steps=1,  # the module logs itself, every log_every_n_steps optimizer steps
    )


@contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) while the context is open, the previous setting after."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar (ETA, and the module's `loss` and `tok_s`) over the run's micro-batches: the default
    caps its total at max_steps, which here counts optimizer steps, not batches."""

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.num_training_batches

    def init_validation_tqdm(self) -> Tqdm:
        """No validation bar: its result is one log line (`step N: validation loss ...`), and a second bar, drawn
        below the training one, printed a line per validation batch wherever stdout is no terminal (a pipe, a
        log file)."""
        return Tqdm(disable=True)


class InterruptRecorder(Callback):
    """Lightning answers Ctrl-C by ignoring SIGINT from then on and calling exit(1); this keeps the interrupt so
    that `raised()` can raise it again, with SIGINT handled as before."""

    def __init__(self):
        self.interrupt: KeyboardInterrupt | None = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupt = exception

    @contextmanager
    def raised(self):
        handler = signal.getsignal(signal.SIGINT)
        try:
            yield
        except SystemExit:
            if self.interrupt is None:
                raise
            signal.signal(signal.SIGINT, handler)
            raise self.interrupt from None
