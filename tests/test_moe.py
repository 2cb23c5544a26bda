"""dsv3/model/moe.py: router semantics, grouped-GEMM experts, balance loss, expert loads."""

import pytest
import torch

from dsv3.model import DSV3Config
from dsv3.model.moe import (
    GroupedExperts,
    MoE,
    Router,
    grouped_linear,
    sequence_balance_loss,
    tokens_per_expert,
)


def moe_config(**overrides) -> DSV3Config:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        aux_loss_alpha=1e-2,
        num_attention_heads=2,
        num_hidden_layers=2,
        first_k_dense_replace=1,
    )
    return DSV3Config(**{**fields, **overrides})


def randomised(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        p.data.normal_(0, std)
    return module


def test_grouped_gemm_equals_per_expert_loop():
    experts = randomised(GroupedExperts(4, 16, 8))
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 16, requires_grad=True)
    y = experts(x, counts)
    g = torch.randn_like(y)
    y.backward(g)
    grads = (x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
    x.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        gate, up = (x[start : start + n] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        rows.append((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
        start += n
    loop = torch.cat(rows)
    loop.backward(g)
    torch.testing.assert_close(y, loop)
    for ours, theirs in zip(grads, (x.grad, experts.gate_up_proj.grad, experts.down_proj.grad), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_grouped_linear_op_equals_the_grouped_gemm_it_wraps():
    """dsv3::grouped_linear (what a compiled block runs for non-bf16 dtypes): the same output and input gradient
    bit for bit, the weight gradient within rounding (computed in the weight's layout), zeros for an idle expert;
    torch.library.opcheck checks its fake shapes and autograd registration."""
    experts = randomised(GroupedExperts(4, 16, 8))
    offsets = torch.tensor([3, 3, 8, 10], dtype=torch.int32)  # expert 1 has no rows
    x = torch.randn(10, 16, requires_grad=True)
    g = torch.randn(10, 16)
    y = torch._grouped_mm(x, experts.gate_up_proj.transpose(-2, -1), offs=offsets)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), experts.gate_up_proj.detach().clone().requires_grad_()
    y2 = grouped_linear(x2, w2, offsets)
    y2.backward(g)
    assert torch.equal(y2, y) and torch.equal(x2.grad, x.grad)
    torch.testing.assert_close(w2.grad, experts.gate_up_proj.grad, rtol=1e-6, atol=1e-6)
    assert w2.grad.is_contiguous() and torch.all(w2.grad[1] == 0)
    torch.library.opcheck(grouped_linear, (x2, w2, offsets))


def test_tokens_per_expert_counts_sorted_ids_with_a_fixed_length():
    ids = torch.tensor([0, 0, 2, 2, 2, 5])
    assert tokens_per_expert(ids, 7).tolist() == torch.bincount(ids, minlength=7).tolist() == [2, 0, 3, 0, 0, 1, 0]


def test_grouped_gemm_needs_aligned_sizes():
    with pytest.raises(ValueError, match="multiples of 8"):
        GroupedExperts(4, 12, 8)


def test_bias_changes_choice_but_not_gate_weights_and_gets_no_gradient():
    router = randomised(Router(moe_config(n_group=1, topk_group=1)))
    x = torch.randn(64, 32)
    idx0, w0, scores = router(x)
    router.e_score_correction_bias[3] = 10.0  # expert 3 now always wins a slot
    idx1, w1, scores1 = router(x)
    assert (idx1 == 3).any(dim=-1).all() and not (idx0 == 3).any(dim=-1).all()
    torch.testing.assert_close(scores1, scores)
    expected = scores.gather(1, idx1)
    torch.testing.assert_close(w1, 2.5 * expected / expected.sum(-1, keepdim=True))  # unbiased scores only
    same = (idx0.sort(-1).values == idx1.sort(-1).values).all(-1)
    torch.testing.assert_close(w0.sort(-1).values[same], w1.sort(-1).values[same])
    w1.sum().backward()
    assert not router.e_score_correction_bias.requires_grad and router.e_score_correction_bias.grad is None
    assert router.weight.grad is not None


def test_no_token_routes_outside_its_topk_groups():
    router = randomised(
        Router(moe_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4))
    )
    router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(256, 32)
    idx, _, scores = router(x)
    biased = (scores + router.e_score_correction_bias).view(-1, 4, 4)
    best_groups = biased.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices.sort(-1).values  # (N, 2)
    groups_used = idx // 4
    assert all(len(set(g)) <= 2 for g in groups_used.tolist())
    assert all(set(g) <= set(b) for g, b in zip(groups_used.tolist(), best_groups.tolist(), strict=True))


def test_softmax_scoring_option():
    router = randomised(Router(moe_config(scoring_func="softmax", norm_topk_prob=False)))
    idx, w, scores = router(torch.randn(8, 32))
    torch.testing.assert_close(scores.sum(-1), torch.ones(8))
    torch.testing.assert_close(w, 2.5 * scores.gather(1, idx))


def test_sequence_balance_loss_hand_computed():
    # one sequence, T = 2 tokens, E = 4 experts, K = 2
    scores = torch.tensor([[[0.8, 0.6, 0.4, 0.2], [0.1, 0.9, 0.5, 0.5]]])
    topk = torch.tensor([[[0, 1], [1, 2]]])
    # f = N_r/(K_r T) * counts = 4/4 * [1, 2, 1, 0]; s' rows: [.4 .3 .2 .1], [.05 .45 .25 .25]
    # P = [.225, .375, .225, .175]; Σ f P = .225 + .75 + .225 = 1.2
    loss = sequence_balance_loss(scores, topk, None, alpha=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.12))
    # a padded third token changes nothing when masked out
    padded = sequence_balance_loss(
        torch.cat((scores, torch.rand(1, 1, 4)), 1),
        torch.cat((topk, torch.tensor([[[2, 3]]])), 1),
        torch.tensor([[True, True, False]]),
        alpha=0.1,
    )
    torch.testing.assert_close(padded, torch.tensor(0.12))


def test_moe_layer_loads_loss_and_shared_expert():
    moe = randomised(MoE(moe_config()))
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    y, balance = moe(x, mask)
    assert y.shape == x.shape and balance.item() > 0
    assert moe.gate.expert_load.sum().item() == 10 * 4  # 10 real tokens × K
    idx, weights, _ = moe.gate(x.view(-1, 32))
    loop = torch.zeros(12, 32)
    for t in range(12):
        for slot in range(4):
            e = idx[t, slot]
            gate, up = (x.view(-1, 32)[t] @ moe.experts.gate_up_proj[e].T).chunk(2)
            loop[t] += weights[t, slot] * ((torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[e].T)
    torch.testing.assert_close(y, (loop + moe.shared_experts(x.view(-1, 32))).view(2, 6, 32))


def test_router_bias_stays_fp32():
    moe = MoE(moe_config()).to(torch.bfloat16)
    moe.gate.e_score_correction_bias += 1e-3
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.e_score_correction_bias[0].item() == pytest.approx(1e-3)


def backward_ops(tensor: torch.Tensor) -> set[str]:
    seen, pending, names = set(), [tensor.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        pending += [next_node for next_node, _ in node.next_functions]
    return names


def test_backward_has_no_thread_order_dependent_scatter():
    """The dispatch gathers tokens with index_select: the backward of advanced indexing (IndexBackward: index_put_
    with accumulate) adds a token's K copies in a thread-dependent order on CPU — runs with the same seed drifted
    apart by 0.6% of validation loss in 100 steps. index_select's backward (index_add_) sums in a fixed order."""
    moe = randomised(MoE(moe_config()))
    out, balance = moe(torch.randn(2, 8, 32, requires_grad=True))
    ops = backward_ops(out.sum() + balance)
    assert "IndexSelectBackward0" in ops and "IndexBackward0" not in ops
