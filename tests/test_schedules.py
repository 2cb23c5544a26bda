"""The pretraining schedules at given tokens: the paper's LR shape, the λ and γ switches, the batch ramp."""

import math

import pytest

from dsv3.config import ExtendPhase, ExtendSection, PretrainSection, RecipeError, validate_recipe
from dsv3.train.schedules import (
    accumulation_steps,
    bias_update_speed,
    global_batch_size,
    learning_rate,
    mtp_weight,
    step_plan,
)
from dsv3.train.settings import LoopSettings

TOTAL = 1000


def paper(**changes) -> LoopSettings:
    """The paper's shape in round fractions: warm-up to 0.1, constant to 0.5, cosine to 0.9, tail from 0.95."""
    fields = dict(
        tokens=TOTAL, lr_peak=2e-4, lr_warmup_fraction=0.1, lr_decay_start_fraction=0.5,
        lr_decay_end_fraction=0.9, lr_final=2e-5, lr_tail_start_fraction=0.95, lr_tail=5e-6,
        mtp_lambda_switch_fraction=0.6, bias_update_switch_fraction=0.8,
    )
    return LoopSettings.from_pretrain(PretrainSection(**(fields | changes)))


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (0, 0.0),
        (50, 1e-4),  # half-way through the warm-up
        (100, 2e-4),
        (300, 2e-4),  # constant
        (700, 2e-5 + 0.5 * (2e-4 - 2e-5)),  # cosine midpoint
        (899, None),  # just before the end of the cosine: close to lr_final
        (920, 2e-5),  # first tail
        (960, 5e-6),  # last tail
        (1000, 5e-6),
    ],
)
def test_learning_rate_follows_the_papers_shape(tokens, expected):
    lr = learning_rate(tokens, TOTAL, paper())
    if expected is None:
        assert 2e-5 < lr < 2e-5 + 1e-7
    else:
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_quarter_point():
    lr = learning_rate(600, TOTAL, paper())  # a quarter of the way from 0.5 to 0.9
    assert lr == pytest.approx(2e-5 + 0.5 * 1.8e-4 * (1 + math.cos(math.pi / 4)))


def test_mtp_weight_and_bias_speed_switch():
    cfg = paper()
    assert mtp_weight(599, TOTAL, cfg) == 0.3 and mtp_weight(600, TOTAL, cfg) == 0.1
    assert bias_update_speed(799, TOTAL, cfg) == 0.001 and bias_update_speed(800, TOTAL, cfg) == 0.0


def test_batch_size_ramps_linearly_in_tokens_rounded_to_whole_micro_batches():
    cfg = paper(global_batch_size=64, micro_batch_size=8, batch_size_start=16, batch_ramp_fraction=0.5, devices=2)
    assert accumulation_steps(cfg) == 4  # 64 / (8 × 2)
    assert global_batch_size(0, TOTAL, cfg) == 16
    assert global_batch_size(250, TOTAL, cfg) == 40  # 16 + 0.5 × 48
    assert global_batch_size(260, TOTAL, cfg) == 40  # 40.96 rounded down to a multiple of 8 (4 × 2 ranks)
    assert global_batch_size(500, TOTAL, cfg) == 64


def test_step_plan_covers_the_tokens_and_counts_offsets():
    cfg = paper(tokens=10_000, global_batch_size=8, micro_batch_size=2, batch_size_start=4, batch_ramp_fraction=0.5)
    plan = step_plan(cfg, seq_len=16)
    assert plan.batch_sizes[0] == 4 and plan.batch_sizes[-1] == 8
    assert plan.total_tokens >= 10_000 > plan.tokens_before(plan.steps - 1)
    assert plan.tokens_before(3) == sum(plan.batch_sizes[:3]) * 16
    fixed = step_plan(LoopSettings.from_pretrain(PretrainSection(steps=5, global_batch_size=8, micro_batch_size=4)), seq_len=16)
    assert fixed.batch_sizes == (8,) * 5 and fixed.total_tokens == 5 * 8 * 16


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"global_batch_size": 8}, "exactly one of"),
        ({"tokens": 10, "global_batch_size": 12, "micro_batch_size": 8}, "multiple of micro_batch_size"),
        ({"tokens": 10, "lr_decay_start_fraction": 0.99, "lr_decay_end_fraction": 0.9}, "warmup <= decay_start"),
        ({"tokens": 10, "balancing": "switch"}, "pretrain.balancing"),
    ],
)
def test_bad_sections_are_one_line_errors(section, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe({"name": "x", "pretrain": section})


def test_an_extension_phase_is_the_loop_with_a_constant_lr_after_its_warm_up():
    ext = ExtendSection(phases=[ExtendPhase(seq_len=64, tokens=1000, global_batch_size=4)], lr=1e-4, lr_warmup_steps=2)
    settings = LoopSettings.for_extension(PretrainSection(tokens=TOTAL, lr_peak=3e-3), ext, ext.phases[0])
    assert settings.steps == 4 and settings.tokens is None  # ceil(1000 / (4 × 64))
    plan = step_plan(settings, seq_len=64)
    lrs = [learning_rate(plan.tokens_before(s), plan.total_tokens, settings) for s in range(plan.steps)]
    assert lrs == [0.0, 5e-5, 1e-4, 1e-4]
    assert settings.devices == 1 and settings.balancing == "loss_free" and settings.weight_decay == 0.1


def test_extension_phases_run_on_the_pretrainings_processes_and_strategy():
    ext = ExtendSection(phases=[ExtendPhase(seq_len=64, steps=2, global_batch_size=8, micro_batch_size=2)])
    sharded = PretrainSection(tokens=TOTAL, global_batch_size=8, micro_batch_size=2, devices=4, strategy="fsdp", expert_parallel=2)
    settings = LoopSettings.for_extension(sharded, ext, ext.phases[0])
    assert (settings.devices, settings.strategy, settings.expert_parallel) == (4, "fsdp", 2)
    assert accumulation_steps(settings) == 1  # 8 sequences = 2 per micro-batch × 4 ranks
