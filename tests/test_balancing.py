"""dsv3/train/balancing.py: the loss-free bias update rule on a hand example, applied to every router in place."""

import torch

from dsv3.train.balancing import bias_update, update_router_biases


def test_bias_update_hand_example():
    bias = torch.tensor([[0.0, 0.1, -0.2, 0.0]])
    load = torch.tensor([[6.0, 2.0, 4.0, 4.0]])  # mean 4: overloaded, underloaded, even, even
    new = bias_update(bias, load, speed=0.001)
    assert torch.allclose(new, torch.tensor([[-0.001, 0.101, -0.2, 0.0]]))


class _Gate:
    def __init__(self, bias):
        self.e_score_correction_bias = torch.tensor(bias)


def test_every_router_moves_from_the_step_loads_and_speed_zero_moves_none():
    gates = [_Gate([0.0, 0.0, 0.0]), _Gate([0.5, 0.5, 0.5])]
    load = torch.tensor([[6.0, 2.0, 4.0], [0.0, 0.0, 12.0]])  # (routers, experts), summed over micro-batches and ranks
    update_router_biases(gates, load, speed=0.01)
    assert torch.allclose(gates[0].e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0]))
    assert torch.allclose(gates[1].e_score_correction_bias, torch.tensor([0.51, 0.51, 0.49]))
    update_router_biases(gates, load, speed=0.0)
    assert torch.allclose(gates[0].e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0]))
