"""The training loop's settings: one frozen object the loop reads, built from the recipe's `pretrain` section or
from one phase of its `extend` section — so the extension stage never forges a pretraining section.

One schema: `LoopSettings` is the pretrain section's (docs/paper.md, "Pretraining": positions in the run are
fractions of its tokens), frozen. An extension phase is the same loop with some fields replaced, listed as data
below: its own batch and steps, a constant LR after a warm-up, constant λ and γ and the extend section's intervals.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ConfigDict

from dsv3.config import ExtendPhase, ExtendSection, PretrainSection

# How an extension phase's loop differs from pretraining (docs/paper.md, "Context extension (YaRN)"), as data: the
# fields read from the extend section (loop field -> extend field), those read from the phase, and those set to a
# constant; its steps and warm-up fraction are computed (for_extension). Every other field (AdamW, clipping,
# precision, processes, strategy) is pretraining's.
FROM_EXTEND = {
    "lr_peak": "lr",
    "mtp_lambda": "mtp_lambda",
    "mtp_lambda_after": "mtp_lambda",
    "bias_update_speed": "bias_update_speed",
    "bias_update_speed_after": "bias_update_speed",
    "val_every_n_steps": "val_every_n_steps",
    "val_max_rows": "val_max_rows",
    "checkpoint_every_n_steps": "checkpoint_every_n_steps",
    "log_every_n_steps": "log_every_n_steps",
}
FROM_PHASE = ("global_batch_size", "micro_batch_size")
EXTENSION_CONSTANTS: dict[str, Any] = {
    "tokens": None,
    "batch_size_start": None,
    "lr_decay_start_fraction": 1.0,  # a constant LR after the warm-up
    "lr_decay_end_fraction": 1.0,
    "lr_tail_start_fraction": 1.0,
    "balancing": "loss_free",
}


class LoopSettings(PretrainSection):
    """Everything `dsv3.train.fit` needs besides the model and the data: the pretrain section's fields (see
    PretrainSection for each), frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_pretrain(cls, cfg: PretrainSection) -> LoopSettings:
        return cls.model_validate(cfg.model_dump())

    @classmethod
    def for_extension(cls, cfg: PretrainSection, ext: ExtendSection, phase: ExtendPhase) -> LoopSettings:
        """One extension phase: pretraining's settings with FROM_EXTEND, FROM_PHASE and EXTENSION_CONSTANTS
        replaced, its steps, and a linear warm-up of extend.lr_warmup_steps."""
        steps = phase.steps or math.ceil(phase.tokens / (phase.global_batch_size * phase.seq_len))
        return cls.from_pretrain(cfg).model_copy(
            update={field: getattr(ext, name) for field, name in FROM_EXTEND.items()}
            | {field: getattr(phase, field) for field in FROM_PHASE}
            | EXTENSION_CONSTANTS
            | {"steps": steps, "lr_warmup_fraction": min(ext.lr_warmup_steps / steps, 1.0)}
        )

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes
