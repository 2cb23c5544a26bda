"""MaxVio (arXiv 2408.15664) on hand examples."""

import pytest
import torch

from dsv3.eval.expert_load import layer_max_violations, max_violation


def test_max_violation_hand_example():
    load = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]])  # balanced; max 5 vs mean 2
    assert max_violation(load) == pytest.approx((0.0 + 1.5) / 2)


def test_max_violation_of_an_empty_layer_is_zero_and_shape_is_checked():
    assert max_violation(torch.zeros(1, 4)) == 0.0
    with pytest.raises(ValueError, match="layers, experts"):
        max_violation(torch.ones(4))


def test_per_layer_max_violations_average_to_max_violation():
    load = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    assert layer_max_violations(load) == pytest.approx([0.0, 1.5, 0.0])
    assert max_violation(load) == pytest.approx(0.5)
