"""The training loop's settings: one frozen object the loop reads, built from the recipe's `pretrain` section or
from one phase of its `extend` section — so the extension stage never forges a pretraining section.

Field names are the pretrain section's (docs/paper.md, "Pretraining"): positions in the run are fractions of its
tokens; an extension phase is the same loop with its own batch, length and a constant LR after a warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from dsv3.config import ExtendPhase, ExtendSection, PretrainSection


@dataclass(frozen=True)
class LoopSettings:
    """Everything `dsv3.train.fit` needs besides the model and the data (see PretrainSection for each field)."""

    steps: int | None
    tokens: int | None
    global_batch_size: int
    micro_batch_size: int
    batch_size_start: int | None
    batch_ramp_fraction: float
    lr_peak: float
    lr_warmup_fraction: float
    lr_decay_start_fraction: float
    lr_decay_end_fraction: float
    lr_final: float
    lr_tail_start_fraction: float
    lr_tail: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    grad_clip: float
    optimizer_states_bf16: bool
    mtp_lambda: float
    mtp_lambda_after: float
    mtp_lambda_switch_fraction: float
    balancing: str
    bias_update_speed: float
    bias_update_speed_after: float
    bias_update_switch_fraction: float
    document_masking: bool
    precision: str
    fp8_backend: str
    accelerator: str
    compile: bool
    devices: int
    num_nodes: int
    strategy: str
    expert_parallel: int
    fsdp_replicate: int
    gradient_sync: str
    activation_checkpointing: str
    activation_checkpointing_every: int
    deterministic: bool
    val_every_n_steps: int
    val_max_rows: int | None
    checkpoint_every_n_steps: int
    log_every_n_steps: int

    @classmethod
    def from_pretrain(cls, cfg: PretrainSection) -> LoopSettings:
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @classmethod
    def for_extension(cls, cfg: PretrainSection, ext: ExtendSection, phase: ExtendPhase) -> LoopSettings:
        """One extension phase (docs/paper.md, "Context extension (YaRN)"): its batch, length and steps; a constant
        LR after a linear warm-up of extend.lr_warmup_steps; constant λ and γ; the extend section's intervals; AdamW,
        clipping, precision, processes and strategy (ddp / fsdp, expert_parallel) as in pretraining."""
        steps = phase.steps or math.ceil(phase.tokens / (phase.global_batch_size * phase.seq_len))
        return replace(
            cls.from_pretrain(cfg),
            steps=steps,
            tokens=None,
            global_batch_size=phase.global_batch_size,
            micro_batch_size=phase.micro_batch_size,
            batch_size_start=None,
            lr_peak=ext.lr,
            lr_warmup_fraction=min(ext.lr_warmup_steps / steps, 1.0),
            lr_decay_start_fraction=1.0,
            lr_decay_end_fraction=1.0,
            lr_tail_start_fraction=1.0,
            mtp_lambda=ext.mtp_lambda,
            mtp_lambda_after=ext.mtp_lambda,
            balancing="loss_free",
            bias_update_speed=ext.bias_update_speed,
            bias_update_speed_after=ext.bias_update_speed,
            val_every_n_steps=ext.val_every_n_steps,
            val_max_rows=ext.val_max_rows,
            checkpoint_every_n_steps=ext.checkpoint_every_n_steps,
            log_every_n_steps=ext.log_every_n_steps,
        )

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes
