"""Auxiliary-loss-free load balancing (DeepSeek-V3 report §2.1.2; arXiv 2408.15664) as a Lightning callback.

After every optimizer step each router's bias moves by b_i += γ·sign(mean load − load_i), from the expert loads
of the whole step: every micro-batch of the step and every rank (summed with an all-reduce), so the biases stay
identical on every rank. The bias only chooses experts; gate weights use the unbiased scores. With
`speed=None` (the auxiliary-loss baseline, which balances through α·L_Bal alone) the callback only measures.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch

from dsv3.eval.expert_load import max_violation


def bias_update(bias: torch.Tensor, expert_load: torch.Tensor, speed: float) -> torch.Tensor:
    """b + γ·sign(mean load − load), per layer: bias and expert_load (L, E) -> new bias (L, E)."""
    return bias + speed * torch.sign(expert_load.mean(dim=-1, keepdim=True) - expert_load)


class LossFreeBalancer(L.Callback):
    """Reads the step's expert loads from the training step's outputs (`step_expert_load`, (G, E) summed over the
    step's micro-batches, G = routers of `model.moe_gates()`), sums them over ranks, updates every router's
    `e_score_correction_bias` with γ = speed(tokens seen) and records the step's batch MaxVio (main layers)."""

    def __init__(self, speed: Callable[[int], float] | None):
        self.speed = speed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        load = outputs.get("step_expert_load") if isinstance(outputs, dict) else None
        if load is None:  # a micro-batch inside the step: the optimizer has not stepped yet
            return
        load = trainer.strategy.reduce(load.clone(), reduce_op="sum")  # (G, E), all ranks
        gates = pl_module.model.moe_gates()
        if self.speed is not None:
            speed = self.speed(pl_module.tokens_seen_before(trainer.global_step - 1))
            if speed:
                bias = torch.stack([gate.e_score_correction_bias for gate in gates])
                new_bias = bias_update(bias, load.to(bias), speed)
                with torch.no_grad():
                    for gate, row in zip(gates, new_bias, strict=True):
                        gate.e_score_correction_bias.copy_(row)
        pl_module.note_step_load(max_violation(load[: pl_module.n_main_moe_layers]))
