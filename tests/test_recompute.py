"""Activation checkpointing (dsv3/train/recompute.py): full and selective recompute the chosen blocks in the backward
and leave the loss and every gradient bit-identical; parameter names do not change; without gradients nothing is
recomputed."""

import pytest
import torch

from dsv3.model import DSV3ForCausalLM
from dsv3.train.recompute import checkpoint_blocks, checkpointed_block_indices
from tests.toy_model import toy_config

CONFIG = dict(num_hidden_layers=3, num_nextn_predict_layers=1, vocab_size=64, max_position_embeddings=32)


def loss_grads_and_calls(mode: str, every: int = 2):
    torch.manual_seed(0)
    model = DSV3ForCausalLM(toy_config(**CONFIG))
    names = [n for n, _ in model.named_parameters()]
    chosen = checkpoint_blocks(model, mode, every)
    assert [n for n, _ in model.named_parameters()] == names
    calls = [0] * len(model.model.layers)
    for i, block in enumerate(model.model.layers):  # a submodule's calls: the recomputation included
        block.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    (out.loss + 0.3 * out.mtp_losses.mean() + out.balance_loss).backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}, chosen, calls


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointed_blocks_recompute_and_leave_the_gradients_unchanged(mode):
    loss, grads, _, calls = loss_grads_and_calls("none")
    assert calls == [1, 1, 1, 1]
    loss_ac, grads_ac, chosen, calls_ac = loss_grads_and_calls(mode)
    assert chosen == ([0, 1, 2, 3] if mode == "full" else [1, 3])  # 3 main blocks + 1 MTP block; k = 2
    assert calls_ac == [2 if i in chosen else 1 for i in range(4)]  # the chosen blocks ran again in the backward
    assert torch.equal(loss_ac, loss)
    for name, grad in grads.items():
        assert torch.equal(grads_ac[name], grad), name


def test_selective_every_k_and_none():
    assert checkpointed_block_indices(7, "selective", 3) == [2, 5]
    assert checkpointed_block_indices(7, "selective", 1) == list(range(7))
    assert checkpointed_block_indices(7, "none", 3) == []


def test_without_gradients_nothing_is_recomputed():
    torch.manual_seed(0)
    model = DSV3ForCausalLM(toy_config(**CONFIG))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
    checkpoint_blocks(model, "full")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, plain)
