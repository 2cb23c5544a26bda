"""Expert-load statistics: MaxVio, the balance metric of the auxiliary-loss-free balancing paper
(arXiv 2408.15664, §4.1): MaxVio = (max_i load_i − mean load) / mean load, averaged over the MoE layers.
"Batch" MaxVio takes the loads of one training step, "global" MaxVio those of the whole validation set.
"""

from __future__ import annotations

import torch


def layer_max_violations(expert_load: torch.Tensor) -> list[float]:
    """expert_load (L, E) token counts per MoE layer and routed expert -> MaxVio of each of the L layers.

    A layer that routed no token counts as balanced (0)."""
    if expert_load.dim() != 2:
        raise ValueError(f"expert_load must be (layers, experts), got shape {tuple(expert_load.shape)}")
    load = expert_load.double()
    mean = load.mean(dim=1)  # (L,)
    violation = (load.max(dim=1).values - mean) / mean.clamp(min=1e-12)
    return torch.where(mean > 0, violation, torch.zeros_like(violation)).tolist()


def max_violation(expert_load: torch.Tensor) -> float:
    """expert_load (L, E) token counts per MoE layer and routed expert -> MaxVio averaged over the L layers."""
    per_layer = layer_max_violations(expert_load)
    return float(torch.tensor(per_layer, dtype=torch.float64).mean())
