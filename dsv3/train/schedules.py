"""The pretraining schedules (docs/paper.md, "Pretraining", "Balancing", "Multi-token prediction"), each a pure
function of the tokens seen, so they do not depend on the batch size and are restored by restoring the step.

Positions are fractions of the run's total tokens, as in the recipe's `pretrain` section (read through
dsv3.train.settings.LoopSettings): the paper's 14.8T
run warms up, holds 2.2e-4 until 10T, decays by a cosine to 2.2e-5 at 14.3T, holds it for 333B and ends at
7.3e-6 for the last 167B; λ switches 0.3 → 0.1 at 10T; γ switches 0.001 → 0 at 14.3T; the batch grows from
3072 to 15360 sequences over the first 469B tokens.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from dsv3.train.settings import LoopSettings


def learning_rate(tokens: int, total_tokens: int, cfg: LoopSettings) -> float:
    """Warm-up → constant → cosine → constant → constant tail, at `tokens` of `total_tokens`."""
    x = tokens / total_tokens
    if x < cfg.lr_warmup_fraction:
        return cfg.lr_peak * x / cfg.lr_warmup_fraction
    if x < cfg.lr_decay_start_fraction:
        return cfg.lr_peak
    if x < cfg.lr_decay_end_fraction:
        progress = (x - cfg.lr_decay_start_fraction) / (cfg.lr_decay_end_fraction - cfg.lr_decay_start_fraction)
        return cfg.lr_final + 0.5 * (cfg.lr_peak - cfg.lr_final) * (1 + math.cos(math.pi * progress))
    if x < cfg.lr_tail_start_fraction:
        return cfg.lr_final
    return cfg.lr_tail


def mtp_weight(tokens: int, total_tokens: int, cfg: LoopSettings) -> float:
    """λ of L_MTP = (λ/D) Σ_k L^k: mtp_lambda before the switch, mtp_lambda_after from it on."""
    return cfg.mtp_lambda if tokens < cfg.mtp_lambda_switch_fraction * total_tokens else cfg.mtp_lambda_after


def bias_update_speed(tokens: int, total_tokens: int, cfg: LoopSettings) -> float:
    """γ of the loss-free balancer: bias_update_speed before the switch, bias_update_speed_after from it on."""
    if tokens < cfg.bias_update_switch_fraction * total_tokens:
        return cfg.bias_update_speed
    return cfg.bias_update_speed_after


def global_batch_size(tokens: int, total_tokens: int, cfg: LoopSettings) -> int:
    """Sequences in the optimizer step that starts at `tokens`: a linear ramp from batch_size_start to
    global_batch_size over batch_ramp_fraction of the run, rounded down to a multiple of ranks × accumulation
    (so every rank runs the same number of equal micro-batches)."""
    if cfg.batch_size_start is None or tokens >= cfg.batch_ramp_fraction * total_tokens:
        return cfg.global_batch_size
    progress = tokens / (cfg.batch_ramp_fraction * total_tokens)
    size = cfg.batch_size_start + progress * (cfg.global_batch_size - cfg.batch_size_start)
    multiple = accumulation_steps(cfg) * cfg.devices * cfg.num_nodes
    return max(multiple, int(size) // multiple * multiple)


def accumulation_steps(cfg: LoopSettings) -> int:
    """Micro-batches per optimizer step on each rank (fixed; during a ramp the micro-batches are smaller)."""
    return cfg.global_batch_size // (cfg.micro_batch_size * cfg.devices * cfg.num_nodes)


@dataclass(frozen=True)
class StepPlan:
    """Every optimizer step of the run, decided before it starts: batch sizes (sequences) and row offsets."""

    batch_sizes: tuple[int, ...]
    seq_len: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row_offsets", (0, *itertools.accumulate(self.batch_sizes)))

    @property
    def steps(self) -> int:
        return len(self.batch_sizes)

    @property
    def total_tokens(self) -> int:
        return self._row_offsets[-1] * self.seq_len

    def rows_before(self, step: int) -> int:
        """Sequences consumed before optimizer step `step` (0-based)."""
        return self._row_offsets[min(step, self.steps)]

    def tokens_before(self, step: int) -> int:
        """Tokens seen before optimizer step `step` (0-based)."""
        return self.rows_before(step) * self.seq_len


def step_plan(cfg: LoopSettings, seq_len: int) -> StepPlan:
    """The steps of the run: until `cfg.tokens` are seen (the last step may pass it), or `cfg.steps` steps.

    With `steps`, the ramp is laid out over the tokens the full-batch run would see (steps × batch × seq_len).
    """
    budget = cfg.tokens if cfg.tokens is not None else cfg.steps * cfg.global_batch_size * seq_len
    sizes: list[int] = []
    seen = 0
    while (seen < budget) if cfg.steps is None else (len(sizes) < cfg.steps):
        size = global_batch_size(seen, budget, cfg)
        sizes.append(size)
        seen += size * seq_len
    return StepPlan(tuple(sizes), seq_len)
