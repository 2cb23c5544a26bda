import math
from types import SimpleNamespace

import pytest
import torch

from dsv3.eval.induction import copy_losses, repeated_random_rows

VOCAB = 50


class Copier(torch.nn.Module):
    """Predicts, at each position, the token that followed the current token's last earlier occurrence (an ideal
    induction head); uniform where the token has not occurred before."""

    def forward(self, input_ids, use_cache=False):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, VOCAB)
        for b in range(B):
            for t in range(T):
                earlier = (input_ids[b, :t] == input_ids[b, t]).nonzero()
                if len(earlier):
                    logits[b, t, input_ids[b, earlier[-1, 0] + 1]] = 30.0
        return SimpleNamespace(logits=logits)


class Uniform(torch.nn.Module):
    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_rows_repeat_a_seeded_draw_from_the_pool():
    pool = list(range(10, VOCAB))
    rows = repeated_random_rows(pool, rows=4, length=12, seed=3)
    assert rows.shape == (4, 24)
    assert torch.equal(rows[:, :12], rows[:, 12:])
    assert set(rows.flatten().tolist()) <= set(pool)
    assert torch.equal(rows, repeated_random_rows(pool, rows=4, length=12, seed=3))
    assert not torch.equal(rows, repeated_random_rows(pool, rows=4, length=12, seed=4))


@pytest.mark.parametrize("rows,length,pool", [(0, 8, range(10)), (2, 1, range(10)), (2, 8, [7])])
def test_bad_arguments_are_refused(rows, length, pool):
    with pytest.raises(ValueError):
        repeated_random_rows(list(pool), rows, length, seed=0)


def test_an_ideal_copier_predicts_the_second_copy_and_a_uniform_model_does_not():
    # Distinct tokens within a row, so the first copy offers the copier nothing to copy.
    rows = torch.stack([torch.randperm(VOCAB)[:16] for _ in range(3)])
    rows = torch.cat([rows, rows], dim=1)
    copier = copy_losses(Copier(), rows, batch_size=2)
    assert copier["first_copy_loss"] == pytest.approx(math.log(VOCAB), abs=1e-5)
    assert copier["second_copy_loss"] < 1e-6
    assert copier["induction_gain"] == pytest.approx(math.log(VOCAB), abs=1e-5)
    uniform = copy_losses(Uniform(), rows)
    assert uniform["first_copy_loss"] == pytest.approx(uniform["second_copy_loss"]) == pytest.approx(math.log(VOCAB))
    assert uniform["induction_gain"] == pytest.approx(0.0, abs=1e-6)


def test_the_probe_restores_training_mode():
    model = Uniform().train()
    copy_losses(model, repeated_random_rows(range(VOCAB), 2, 4, seed=0))
    assert model.training
