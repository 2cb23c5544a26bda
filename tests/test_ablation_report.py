"""dsv3/ablation_report.py: the estimator, the holds / fails / not-resolved rule and the seeds to decide on hand
numbers, claims over seeds, the markdown (per seed values, missing arms) and the plots."""

import math

import pytest

from dsv3.ablation_report import (
    ABLATIONS,
    CLAIMS,
    FAILS,
    HOLDS,
    MISSING,
    RULE,
    UNRESOLVED,
    ArmRun,
    Spread,
    check_pair,
    claim_result,
    claim_rows,
    comparison_markdown,
    confidence_half_width,
    moe_layers,
    plot_curves,
    plot_maxvio,
    relative_gap,
    second_half_mean,
    seeds_to_decide,
    verdict,
)


def test_confidence_half_width_is_students_t():
    # t(0.975, 2) = 4.3027, t(0.975, 4) = 2.7764 (tables): h = t·sd/√n
    assert confidence_half_width(1.0, 3) == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert confidence_half_width(2.0, 5) == pytest.approx(2 * 2.7764 / math.sqrt(5), rel=1e-4)


def test_direction_rule_on_hand_numbers():
    # d̄ = 0.011, sd = 0.001, n = 3: h = 2.48·sd = 0.0025 < |d̄| -> resolved; the sign decides yes or no
    assert verdict([0.010, 0.011, 0.012], "direction", +1) == HOLDS
    assert verdict([0.010, 0.011, 0.012], "direction", -1) == FAILS
    assert verdict([-0.010, -0.011, -0.012], "direction", -1) == HOLDS
    # d̄ = 0.01, sd = 0.01: h = 0.025 -> not resolved, whatever the sign
    assert verdict([0.0, 0.01, 0.02], "direction", +1) == UNRESOLVED
    assert verdict([0.0, 0.01, 0.02], "direction", -1) == UNRESOLVED
    # either side of the boundary |d̄| = 2.484·sd (n = 3)
    assert Spread.of([2.4, 4.0, 5.6]).sd == pytest.approx(1.6)
    assert verdict([2.4, 4.0, 5.6], "direction", +1) == HOLDS  # h = 3.97 < 4
    assert verdict([2.3, 4.0, 5.7], "direction", +1) == UNRESOLVED  # h = 4.22 > 4
    # the same spread is decided with more seeds: five values, d̄ = 4, sd = 2.9 -> h = 3.6
    assert verdict([0.5, 2.0, 4.0, 6.0, 7.5], "direction", +1) == HOLDS
    assert verdict([0.5, 4.0, 7.5], "direction", +1) == UNRESOLVED
    assert math.isnan(Spread.of([1.0]).sd)
    assert verdict([-1.0, 1.0], "direction", +1) == UNRESOLVED
    # one seed resolves nothing; identical differences are beyond a zero spread
    assert verdict([0.5], "direction", +1) == UNRESOLVED
    assert verdict([0.2, 0.2, 0.2], "direction", +1) == HOLDS


def test_bound_and_threshold_rules_on_hand_numbers():
    bound = 0.0025  # FP8: |gap| < 0.25%
    assert verdict([0.0010, 0.0012, 0.0008], "bound", bound) == HOLDS  # 0.001 + 2.48*0.0002 < 0.0025
    assert verdict([0.0010, 0.0030, -0.0010], "bound", bound) == UNRESOLVED  # 0.001 + 2.48*0.002 > 0.0025 > 0.001 - ...
    assert verdict([0.030, 0.031, 0.029], "bound", bound) == FAILS  # 0.03 - 2.48*0.001 > 0.0025
    assert verdict([-0.030, -0.031, -0.029], "bound", bound) == FAILS  # |d̄| counts
    assert verdict([0.90, 0.91, 0.92], "threshold", 0.85) == HOLDS
    assert verdict([0.50, 0.55, 0.60], "threshold", 0.85) == FAILS
    assert verdict([0.70, 0.85, 1.00], "threshold", 0.85) == UNRESOLVED
    with pytest.raises(ValueError, match="kind"):
        verdict([1.0, 2.0], "sideways", 0)
    assert "t(0.975, n−1)" in RULE and "not resolved" in RULE and "after half of its steps" in RULE


def test_seeds_to_decide_is_the_first_n_whose_interval_decides():
    # d̄ = sd = 0.01: t(0.975, n−1)/√n < 1 first at n = 7 (2.447/2.646 = 0.92; n = 6: 2.571/2.449 = 1.05)
    values = [0.0, 0.01, 0.02]
    assert verdict(values, "direction", +1) == UNRESOLVED and seeds_to_decide(values, "direction", +1) == 7
    assert verdict(values + [0.0, 0.01, 0.02, 0.01], "direction", +1) == HOLDS  # 7 such seeds do decide it
    # a bound: d̄ 0.1%, sd 0.2% -> |d̄| + h < 0.25% from n = 10 (h = 2.262·0.2/3.16 = 0.143%)
    assert seeds_to_decide([0.0010, 0.0030, -0.0010], "bound", 0.0025) == 10
    # already decided at n: that n or fewer; nothing to learn from one value; a mean on the bound never decides
    assert seeds_to_decide([0.010, 0.011, 0.012], "direction", +1) <= 3
    assert seeds_to_decide([0.5], "direction", +1) is None
    assert seeds_to_decide([0.0015, 0.0035], "bound", 0.0025) is None


def test_second_half_mean_reads_the_late_evaluations():
    history = [{"step": 0.0, "val/loss": 9.0}, {"step": 25.0, "train/ce": 7.0}, {"step": 50.0, "val/loss": 5.0},
               {"step": 75.0, "val/loss": 4.0}, {"step": 100.0, "val/loss": 3.0}, {"step": 100.0, "train/ce": 2.5}]
    assert second_half_mean(history, "val/loss") == pytest.approx(3.5)  # steps 75 and 100: after step 50 of 100
    with pytest.raises(ValueError, match="no val/maxvio_global evaluation after step 50"):
        second_half_mean(history, "val/maxvio_global")


def arm(val_loss: float, maxvio: float = 0.5, acceptance: float | None = None, seed: int = 0) -> ArmRun:
    metrics = {"final_val_loss": val_loss, "final_val_bits_per_byte": 1.5, "final_val_maxvio_global": maxvio,
               "steps": 49.0, "stage_seconds": 120.0}
    history = [{"step": 10.0, "train/ce": val_loss + 1, "train/maxvio_batch": maxvio, "train/maxvio_batch_layer1": maxvio,
                "train/maxvio_batch_layer2": maxvio / 2},
               {"step": 20.0, "val/loss": val_loss, "val/maxvio_global": maxvio, "val/maxvio_global_layer1": maxvio}]
    return ArmRun(f"r{seed}", {"pretrain.balancing": "aux_loss", "model.aux_loss_alpha": 0.0}, metrics, history, acceptance, f"run{seed}", seed)


def seeds(*values, **kw) -> dict:
    return {s: arm(v, seed=s, **{k: w[i] for k, w in kw.items()}) for i, (s, v) in enumerate(zip((7, 8, 9), values, strict=False))}


def test_claims_over_seeds_on_hand_numbers():
    runs = {
        "fp8-wide": seeds(4.004, 4.008, 4.006),
        "fp8-wide-bf16": seeds(4.0, 4.0, 4.0),
        "loss-free": seeds(3.96, 3.98, 4.0, maxvio=(0.05, 0.06, 0.07)),
        "aux-loss": seeds(4.0, 4.0, 4.0, maxvio=(0.5, 0.6, 0.7)),
        "mtp-on": seeds(3.9, 4.1, 4.0, acceptance=(0.5, 0.52, 0.54)),
        "mtp-off": seeds(4.0, 4.0, 4.0),
    }
    rows = {(r[0], r[1]): r[2:6] for r in claim_rows(runs)}
    to_decide = {r[1]: r[6] for r in claim_rows(runs)}
    title = {a.name: a.title for a in ABLATIONS}
    fp8 = rows[(title["fp8"], CLAIMS[0].what)]
    # gaps 0.1%, 0.2%, 0.15%: d̄ 0.15%, sd 0.05% -> 0.15 + 0.124 = 0.274, not below the bound 0.25%: not resolved;
    # 0.15 + t·0.05/√n < 0.25 first at n = 4 (t 3.18: 0.080)
    assert fp8 == ("below 0.25% (16B and 230B MoE)", "4.0060 ± 0.0020 vs 4.0000 ± 0.0000", "+0.15% ± 0.05% (3 seeds)", UNRESOLVED)
    scaling = rows[(title["fp8"], CLAIMS[1].what)]
    assert scaling[2:] == (MISSING, MISSING)  # the per-tensor arm has not run: missing, never a zero
    maxvio = rows[(title["balancing"], CLAIMS[2].what)]
    assert maxvio[1:] == ("0.060 ± 0.010 vs 0.600 ± 0.100", "-0.540 ± 0.090 (3 seeds)", HOLDS)
    loss = rows[(title["balancing"], CLAIMS[3].what)]
    assert loss[0].startswith("-0.28%") and loss[2] == "-0.50% ± 0.50% (3 seeds)" and loss[3] == UNRESOLVED
    assert rows[(title["balancing"], CLAIMS[4].what)][3] == MISSING
    mtp_loss, acceptance = rows[(title["mtp"], CLAIMS[5].what)], rows[(title["mtp"], CLAIMS[6].what)]
    assert mtp_loss[3] == UNRESOLVED and acceptance[1:] == ("—", "52.0% ± 2.0% (3 seeds)", FAILS)
    assert to_decide[CLAIMS[0].what] == "4" and to_decide[CLAIMS[2].what] == "—" and to_decide[CLAIMS[4].what] == "—"

    # pairs are by seed: a seed only one arm ran is left out of the differences
    runs["fp8-wide-bf16"] = {7: arm(4.0, seed=7), 8: arm(4.0, seed=8)}
    result = claim_result(CLAIMS[0], runs)
    assert sorted(result.per_seed) == [7, 8] and result.spread.n == 2
    assert result.per_seed[7] == pytest.approx(relative_gap(4.004, 4.0))


def test_markdown_shows_every_seed_and_missing_arms(tmp_path):
    runs = {"loss-free": seeds(3.96, 3.98, 4.0), "aux-loss": seeds(4.0, 4.01, 4.02)}
    text = comparison_markdown(runs, {"balancing": ["balancing_curves.png", "balancing_maxvio.png"]}, seeds=[7, 8, 9])
    assert "seeds 7, 8, 9" in text and RULE in text and "10^7" in text  # the rule and what a CPU cannot show, up front
    assert "BlockWise128x128" in text and "TensorWise" in text  # the scaled_mm note for GPUs
    per_seed = text.split("## Per seed", 1)[1]
    for value in ("3.9600", "3.9800", "4.0000", "4.0100", "4.0200"):
        assert value in per_seed
    assert "| loss-free | 3.9600 / 0.500 (run7) | 3.9800 / 0.500 (run8) | 4.0000 / 0.500 (run9) |" in per_seed
    assert "| fp8-wide | missing | missing | missing |" in per_seed
    assert "| fp8 | fp8-wide | missing |" in text  # arms table
    assert "![balancing](balancing_maxvio.png)" in text
    # the arm's switch and the settings that go with it (no-balancing is aux_loss with alpha 0)
    assert "| loss-free | r7 | pretrain.balancing = aux_loss; model.aux_loss_alpha = 0.0 | 3 | 3.9800 ± 0.0200 |" in text


def test_plots_draw_every_arm_and_moe_layer(tmp_path):
    runs = {"loss-free": seeds(3.9, 4.0, 4.1), "aux-loss": seeds(4.0, 4.0, 4.0), "no-balancing": {7: arm(4.1, 2.0, seed=7)}}
    balancing = ABLATIONS[1]
    assert moe_layers(runs, balancing.arms) == [1, 2]
    assert plot_maxvio(balancing, runs, tmp_path / "m.png").stat().st_size > 10_000
    assert plot_curves(balancing, runs, tmp_path / "c.png").stat().st_size > 10_000


def test_check_pair_names_a_second_difference():
    ablation = ABLATIONS[1]
    a = {"name": "a", "pretrain.balancing": "loss_free", "seed": 1}
    b = {"name": "b", "pretrain.balancing": "aux_loss", "seed": 2}
    with pytest.raises(ValueError, match=r"must differ only in pretrain.balancing .*seed: 1 vs 2"):
        check_pair(ablation, a, b)
    check_pair(ablation, a, b | {"seed": 1, "model.aux_loss_alpha": 0.0})
