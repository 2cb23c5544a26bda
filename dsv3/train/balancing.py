"""Auxiliary-loss-free load balancing (DeepSeek-V3 report §2.1.2; arXiv 2408.15664): after every optimizer step each
router's bias moves by b_i += γ·sign(mean load − load_i), from the expert loads of the whole step — every
micro-batch and every rank (summed with an all-reduce) — so the biases stay identical on every rank. The bias only
chooses experts; gate weights use the unbiased scores. The auxiliary-loss baseline (`balancing: aux_loss`) balances
through α·L_Bal alone and never moves the biases.
"""

from __future__ import annotations

import torch


def bias_update(bias: torch.Tensor, expert_load: torch.Tensor, speed: float) -> torch.Tensor:
    """b + γ·sign(mean load − load), per layer: bias and expert_load (L, E) -> new bias (L, E)."""
    return bias + speed * torch.sign(expert_load.mean(dim=-1, keepdim=True) - expert_load)


@torch.no_grad()
def update_router_biases(gates: list, expert_load: torch.Tensor, speed: float) -> None:
    """Apply `bias_update` in place to every router's e_score_correction_bias; expert_load (G, E) for the G routers
    of `gates` (summed over the step's micro-batches and ranks)."""
    if not speed:
        return
    bias = torch.stack([gate.e_score_correction_bias for gate in gates])
    for gate, row in zip(gates, bias_update(bias, expert_load.to(bias), speed), strict=True):
        gate.e_score_correction_bias.copy_(row)
