"""Loss-free balancing: the bias update rule on a hand example, and the callback on a real step's loads."""

import torch

from dsv3.stages.balancing import LossFreeBalancer, bias_update


def test_bias_update_hand_example():
    bias = torch.tensor([[0.0, 0.1, -0.2, 0.0]])
    load = torch.tensor([[6.0, 2.0, 4.0, 4.0]])  # mean 4: overloaded, underloaded, even, even
    new = bias_update(bias, load, speed=0.001)
    assert torch.allclose(new, torch.tensor([[-0.001, 0.101, -0.2, 0.0]]))


class _Gate:
    def __init__(self, bias):
        self.e_score_correction_bias = torch.tensor(bias)


class _Model:
    def __init__(self):
        self.gates = [_Gate([0.0, 0.0, 0.0]), _Gate([0.5, 0.5, 0.5])]

    def moe_gates(self):
        return self.gates


class _Strategy:
    def __init__(self, world):
        self.world = world

    def reduce(self, tensor, reduce_op):
        assert reduce_op == "sum"
        return tensor * self.world  # every rank saw the same loads


class _Trainer:
    def __init__(self, world):
        self.strategy, self.global_step = _Strategy(world), 1


class _Module:
    n_main_moe_layers = 1

    def __init__(self):
        self.model, self.noted = _Model(), []

    def tokens_seen_before(self, step):
        return 0

    def note_step_load(self, value):
        self.noted.append(value)


def test_callback_updates_every_router_from_the_summed_step_loads():
    module = _Module()
    load = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 6.0]])  # (routers, experts), summed over micro-batches
    LossFreeBalancer(lambda tokens: 0.01).on_train_batch_end(_Trainer(2), module, {"step_expert_load": load}, None, 0)
    assert torch.allclose(module.model.gates[0].e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0]))
    assert torch.allclose(module.model.gates[1].e_score_correction_bias, torch.tensor([0.51, 0.51, 0.49]))
    assert module.noted == [0.5]  # MaxVio of the main layer: (6 − 4) / 4


def test_callback_waits_for_the_optimizer_step_and_baseline_only_measures():
    module = _Module()
    LossFreeBalancer(lambda tokens: 0.01).on_train_batch_end(_Trainer(1), module, {"loss": 0.0}, None, 0)
    LossFreeBalancer(None).on_train_batch_end(_Trainer(1), module, {"step_expert_load": torch.ones(2, 3)}, None, 0)
    assert all(float(g.e_score_correction_bias.sum()) in (0.0, 1.5) for g in module.model.gates)
    assert module.noted == [0.0]
