"""dsv3/fp8/optim.py: AdamW with BF16 moments (DeepSeek-V3 section 3.3.3) against torch.optim.AdamW.

Bound: the moments are stored with BF16's relative rounding of at most 2^-9, so each Adam update m̂/(√v̂ + ε)
differs from AdamW's by at most about 2^-9 + 2^-10 relative; over the steps below the parameters' drift from
AdamW's, relative to the distance they moved, measures ~2e-3 and we assert below 2^-7.
"""

import pytest
import torch

from dsv3.fp8 import AdamWBF16Moments

KW = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def train(optimizer_cls, steps: int):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))]
    optimizer = optimizer_cls(params, **KW)
    grads = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads) * (1 + step)
        optimizer.step()
    return params, optimizer


def test_one_step_equals_adamw():
    ours, _ = train(AdamWBF16Moments, 1)
    ref, _ = train(torch.optim.AdamW, 1)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_many_steps_close_to_adamw_with_bf16_moments():
    torch.manual_seed(0)
    start = [torch.randn(16, 8), torch.randn(8)]
    ours, optimizer = train(AdamWBF16Moments, 20)
    ref, _ = train(torch.optim.AdamW, 20)
    for a, b, s in zip(ours, ref, start, strict=True):
        drift = ((a - b).norm() / (b - s).norm()).item()
        assert 0 < drift < 2**-7  # bf16 storage changes something, and only a little
    states = optimizer.state.values()
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert all(p.dtype == torch.float32 for p in ours)


def test_resume_from_state_dict_is_exact():
    whole, _ = train(AdamWBF16Moments, 6)
    params, optimizer = train(AdamWBF16Moments, 3)
    saved = optimizer.state_dict()
    resumed = AdamWBF16Moments(params, **KW)
    resumed.load_state_dict(saved)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in resumed.state.values())
    grads = torch.Generator().manual_seed(1)
    for step in range(6):
        for p in params:
            g = torch.randn(p.shape, generator=grads) * (1 + step)
            if step >= 3:
                p.grad = g
        if step >= 3:
            resumed.step()
    for a, b in zip(params, whole, strict=True):
        assert torch.equal(a, b)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="betas"):
        AdamWBF16Moments([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))
