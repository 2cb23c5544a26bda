"""Activation checkpointing (`pretrain.activation_checkpointing`): chosen decoder blocks keep only their input for
the backward and run their forward again there (torch.utils.checkpoint, non-reentrant), as torchtitan's full and
per-block selective modes do: activation memory for compute, about one more forward of those blocks per step.

Blocks: the main model's decoder blocks, then the MTP modules' blocks (model.model.layers); "full" checkpoints every
one, "selective" blocks k, 2k, 3k, … (1-based) for k = `every`. The block's `forward` is wrapped in place rather
than the block in a CheckpointWrapper, so parameter names, state dicts and checkpoints stay those of a plain model;
FSDP2's hooks stay on the block, which gathers its weights again before the recomputation. Without gradients
(validation, generation) the block runs as usual.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed_block_indices(n_blocks: int, mode: str, every: int) -> list[int]:
    """Indices into model.model.layers that `mode` ("none", "full", "selective") checkpoints."""
    if mode == "full":
        return list(range(n_blocks))
    if mode == "selective":
        return [i for i in range(n_blocks) if (i + 1) % every == 0]
    return []


def checkpoint_blocks(model: nn.Module, mode: str, every: int = 1) -> list[int]:
    """In place: the chosen blocks of a DSV3ForCausalLM recompute their activations in the backward; returns their
    indices. Call before fully_shard and torch.compile (as CausalLMTraining does)."""
    blocks = model.model.layers
    chosen = checkpointed_block_indices(len(blocks), mode, every)
    for i in chosen:
        blocks[i].forward = recomputed(blocks[i].forward)
    return chosen


def recomputed(forward):
    """`forward` under torch.utils.checkpoint when autograd records, as is otherwise."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
