"""dsv3/store/health.py: each stage's checks judged from its metrics against the recipe's thresholds."""

import math

from dsv3.config import load_recipe
from dsv3.stages import get_stage
from dsv3.store.health import count_nonfinite
from dsv3.store.health import judge as judge_declared
from tests.conftest import RECIPES

TINY = load_recipe(RECIPES / "tiny.yaml")


def judge(stage: str, metrics, checks):
    return judge_declared(get_stage(stage), metrics, checks)


def verdicts(stage, metrics, checks=TINY.checks):
    return {c.name: c.passed for c in judge(stage, metrics, checks)}


def test_pretrain_must_beat_the_unigram_baseline():
    assert verdicts("pretrain", {"final_val_loss": 4.0, "unigram_val_loss": 6.3}) == {
        "pretrain.nonfinite_losses": True,
        "checks.pretrain.max_val_loss_ratio": True,
    }
    assert not verdicts("pretrain", {"final_val_loss": 5.3, "unigram_val_loss": 6.3})["checks.pretrain.max_val_loss_ratio"]
    (nan,) = [c for c in judge("pretrain", {"final_val_loss": math.nan, "unigram_val_loss": 6.5}, TINY.checks) if "ratio" in c.name]
    assert not nan.passed  # NaN compares false both ways: it must fail, not pass


def test_sft_format_and_truncation_bounds_and_the_failure_line():
    good = {"heldout_format_rate": 1.0, "heldout_truncated_rate": 0.0}
    assert all(verdicts("sft", good).values())
    broken = judge("sft", {"heldout_format_rate": 0.0, "heldout_truncated_rate": 1.0}, TINY.checks)
    assert [c.line() for c in broken if not c.passed] == [
        "checks.sft.min_format_rate: measured 0, needs ≥ 0.8",
        "checks.sft.max_truncated_rate: measured 1, needs ≤ 0.2",
    ]


def test_thresholds_come_from_the_recipe():
    relaxed = load_recipe(RECIPES / "tiny.yaml", ["checks.sft.min_format_rate=0.0"]).checks
    assert verdicts("sft", {"heldout_format_rate": 0.0}, relaxed)["checks.sft.min_format_rate"]


def test_nonfinite_losses_fail_every_stage_and_missing_metrics_are_left_out():
    for stage in ("tokenizer", "pretrain", "extend", "sft", "reward", "rl"):
        assert verdicts(stage, {"nonfinite_losses": 2.0}) == {f"{stage}.nonfinite_losses": False}
    assert count_nonfinite([1.0, math.nan, math.inf, -math.inf, 0.0]) == 3


def test_each_stage_checks_its_own_metric():
    assert not verdicts("tokenizer", {"bytes_per_token_validation": 1.1})["checks.tokenizer.min_bytes_per_token"]
    assert not verdicts("extend", {"ppl_change_at_original_length": 0.3})["checks.extend.max_ppl_increase"]
    assert not verdicts("reward", {"heldout_pair_accuracy": 0.5})["checks.reward.min_pair_accuracy"]
    reward = verdicts("reward", {"heldout_pair_accuracy": 0.7, "heldout_pair_accuracy_broken_format": 0.775})
    assert reward["checks.reward.min_pair_accuracy"] and not reward["checks.reward.min_broken_format_accuracy"]
    assert not verdicts("rl", {"rollout_truncated_rate": 1.0})["checks.rl.max_truncated_rate"]
    assert verdicts("rl", {"rollout_truncated_rate": 0.2})["checks.rl.max_truncated_rate"]


def test_capability_checks_are_judged_when_the_recipe_sets_them_and_left_out_when_null():
    metrics = {"final_val_loss": 4.0, "unigram_val_loss": 6.3, "induction_gain": 0.01, "mtp_acceptance": 0.7}
    unset = load_recipe(RECIPES / "tiny.yaml", ["checks.pretrain.min_induction_gain=null", "checks.pretrain.min_mtp_acceptance=null"])
    assert set(verdicts("pretrain", metrics, unset.checks)) == {"pretrain.nonfinite_losses", "checks.pretrain.max_val_loss_ratio"}
    strict = load_recipe(RECIPES / "tiny.yaml", ["checks.pretrain.min_induction_gain=1.0", "checks.pretrain.min_mtp_acceptance=0.5"])
    judged = verdicts("pretrain", metrics, strict.checks)
    assert judged["checks.pretrain.min_induction_gain"] is False and judged["checks.pretrain.min_mtp_acceptance"] is True
    sft = load_recipe(RECIPES / "tiny.yaml", ["checks.sft.min_accuracy=0.2"]).checks
    assert verdicts("sft", {"heldout_accuracy": 0.1, "heldout_format_rate": 1.0, "heldout_truncated_rate": 0.0}, sft)[
        "checks.sft.min_accuracy"
    ] is False
    extend = load_recipe(RECIPES / "tiny.yaml", ["checks.extend.min_passkey_accuracy_4x=0.8"]).checks
    assert verdicts("extend", {"passkey_accuracy_after_4x": 0.9}, extend)["checks.extend.min_passkey_accuracy_4x"] is True
