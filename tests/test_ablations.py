"""The ablations: each recipe pair differs from its partner in exactly its switch; the claims' arithmetic on hand
numbers; and the flow on smoke-sized arms — measured rows for the pairs that ran, "missing" for the other, one
tokenizer and one pretraining shared where the keys match, and a rerun that starts no stage run."""

import math
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dsv3.ablation_report import (
    ABLATIONS,
    ARMS,
    CLAIMS,
    ArmRun,
    check_pair,
    claim_rows,
    comparison_markdown,
    recipe_differences,
    relative_gap,
)
from dsv3.config import RecipeError, flatten, load_recipe
from dsv3.stages.manifest import read_manifest
from dsv3.stages.runs import run_root
from dsv3.tracking import tracking_uri
from flows.ablations import EXPERIMENT, ablations, load_arms
from tests.conftest import RECIPES

ABLATION_RECIPES = RECIPES / "ablations"


def _flat(stem: str) -> dict:
    return flatten(load_recipe(ABLATION_RECIPES / f"{stem}.yaml"))


def test_recipe_folder_holds_every_arm():
    assert sorted(p.stem for p in ABLATION_RECIPES.glob("*.yaml")) == sorted(ARMS)


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: a.name)
def test_pair_differs_in_its_switch_only(ablation):
    try:
        arm, baseline = _flat(ablation.arm), _flat(ablation.baseline)
    except RecipeError as err:  # FP8 lands in the schema with the precision plugin
        if ablation.name == "fp8" and "pretrain.precision" in str(err):
            pytest.skip(f"the schema does not accept FP8 yet: {err}")
        raise
    assert ablation.switch in recipe_differences(arm, baseline)
    assert set(recipe_differences(arm, baseline)) <= {ablation.switch, *ablation.also}
    assert arm["name"] != baseline["name"]
    tiny = flatten(load_recipe(RECIPES / "tiny.yaml"))
    for flat in (
        arm,
        baseline,
    ):  # overlays of tiny: its seed and data, only the stages and the switch changed
        assert set(recipe_differences(flat, tiny)) <= {"pipeline.stages", ablation.switch, *ablation.also}
        assert flat["pipeline.stages"] == ["tokenizer", "pretrain"]
    check_pair(ablation, arm, baseline)


def test_check_pair_names_a_second_difference():
    ablation = ABLATIONS[1]
    arm = {"name": "a", "pretrain.balancing": "loss_free", "seed": 1}
    baseline = {"name": "b", "pretrain.balancing": "aux_loss", "seed": 2}
    with pytest.raises(ValueError, match=r"must differ only in pretrain.balancing .*seed: 1 vs 2"):
        check_pair(ablation, arm, baseline)


def _arm(val_loss: float, maxvio: float = 0.5, acceptance: float | None = None) -> ArmRun:
    metrics = {
        "final_val_loss": val_loss,
        "final_val_bits_per_byte": 1.5,
        "final_val_maxvio_global": maxvio,
        "steps": 98.0,
        "stage_seconds": 240.0,
    }
    return ArmRun("r", "v", metrics, [], acceptance)


def test_relative_gap_and_claims_on_hand_numbers():
    assert relative_gap(4.008, 4.0) == pytest.approx(0.002)
    assert relative_gap(3.96, 4.0) == pytest.approx(-0.01)
    with pytest.raises(ValueError, match="non-zero"):
        relative_gap(1.0, 0.0)
    runs = {
        "fp8": _arm(4.008),
        "bf16": _arm(4.0),
        "loss-free": _arm(3.96, maxvio=0.05),
        "aux-loss": _arm(4.0, maxvio=0.5),
        "mtp-on": None,
        "mtp-off": _arm(4.0),
    }
    rows = {(r[0], r[1]): r[2:] for r in claim_rows(runs)}
    fp8, maxvio, balance_loss = (rows[(a.title, c.what)] for a in ABLATIONS[:2] for c in CLAIMS[a.name])
    assert fp8 == ("below 0.25% (16B and 230B MoE)", "+0.20% (4.0080 vs 4.0000)", "yes")
    assert maxvio == ("0.04 vs 0.72 (1B MoE)", "0.050 vs 0.500", "yes")
    paper_gap = (math.log(9.50) - math.log(9.56)) / math.log(9.56)
    assert balance_loss == (f"{paper_gap:+.2%} (perplexity 9.50 vs 9.56)", "-1.00% (3.9600 vs 4.0000)", "yes")
    assert balance_loss[0].startswith("-0.28%")
    mtp_rows = [r for r in claim_rows(runs) if r[0] == ABLATIONS[2].title]
    assert [r[3:] for r in mtp_rows] == [("missing", "missing")] * 2  # one arm missing: the pair is missing

    runs["mtp-on"] = _arm(4.04, acceptance=0.5)
    mtp_rows = [r[3:] for r in claim_rows(runs) if r[0] == ABLATIONS[2].title]
    assert mtp_rows == [("+1.00% (4.0400 vs 4.0000)", "no"), ("50.0%", "no")]
    runs["fp8"] = _arm(4.012)
    assert claim_rows(runs)[0][3:] == ("+0.30% (4.0120 vs 4.0000)", "no")

    text = comparison_markdown(runs | {"fp8": None, "bf16": None}, {"balancing": "balancing_curves.png"})
    fp8_rows = [line for line in text.splitlines() if line.startswith("| fp8 |") or "FP8" in line]
    assert fp8_rows and all("missing" in line for line in fp8_rows if line.startswith("|"))
    assert "![balancing](balancing_curves.png)" in text
    assert "n/a (no MTP module)" in text  # mtp-off: not measurable, and not a zero


def test_unknown_recipe_file_is_refused(tmp_path):
    (tmp_path / "fp16.yaml").write_text("name: x\n")
    with pytest.raises(
        ValueError, match="fp16.yaml: not an arm of any ablation; name the file one of fp8, bf16"
    ):
        load_arms(tmp_path)


SWITCHES = {  # loss-free without its partner: a half pair is missing, and mtp-on reuses its pretraining
    "loss-free": {"pretrain": {"balancing": "loss_free"}},
    "mtp-on": {"model": {"num_nextn_predict_layers": 1}},
    "mtp-off": {"model": {"num_nextn_predict_layers": 0}},
}
FEW_STEPS = {"steps": 8, "val_every_n_steps": 4, "checkpoint_every_n_steps": 4, "log_every_n_steps": 2}


def _stage_runs(client: MlflowClient, experiment_id: str) -> list:
    return [r for r in client.search_runs([experiment_id]) if "dsv3.stage" in r.data.tags]


@pytest.mark.slow
def test_flow_runs_a_pair_reuses_and_reports_missing(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for stem, switch in SWITCHES.items():  # smoke-sized arms with the real switches
        overlay = {"base": str(RECIPES / "smoke.yaml"), "name": f"t-{stem}"}
        overlay |= {"pipeline": {"stages": ["tokenizer", "pretrain"]}, "pretrain": dict(FEW_STEPS)}
        for section, values in switch.items():
            overlay[section] = overlay.get(section, {}) | values
        (recipes / f"{stem}.yaml").write_text(yaml.safe_dump(overlay))
    runs_dir = tmp_path / "runs"
    report = ablations(recipes_dir=str(recipes), runs_dir=str(runs_dir), acceptance=(2, 16, 8))
    text = report.read_text()

    rows = claim_rows_from(text)
    fp8, balancing, mtp = ([r[3:] for r in rows if r[0] == a.title] for a in ABLATIONS)
    assert fp8 == [["missing", "missing"]] and balancing == [["missing", "missing"]] * 2
    assert mtp[0][0].endswith(")") and mtp[0][1] in ("yes", "no")  # the loss gap, measured
    assert re.fullmatch(r"\d+\.\d%", mtp[1][0]) and mtp[1][1] in ("yes", "no")  # the acceptance rate
    assert (report.parent / "mtp_curves.png").stat().st_size > 10_000
    assert (
        not (report.parent / "fp8_curves.png").exists()
        and not (report.parent / "balancing_curves.png").exists()
    )
    assert "n/a (no MTP module)" in text
    assert (report.parent / "ablations.html").read_text().count("data:image/png;base64,") == 1

    # shared work: one tokenizer for all arms; mtp-on is loss-free but for the name and reuses its pretraining
    client = MlflowClient(tracking_uri(runs_dir))
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    stage_runs = _stage_runs(client, experiment)
    assert sorted(r.data.tags["dsv3.stage"] for r in stage_runs) == ["pretrain", "pretrain", "tokenizer"]
    assert all(r.data.tags["ablation"] in ("balancing", "mtp") for r in stage_runs)
    on, free = (read_manifest(run_root(runs_dir, load_recipe(recipes / f"{s}.yaml")) / "pretrain") for s in ("mtp-on", "loss-free"))
    assert on.mlflow_run_id == free.mlflow_run_id
    runs = client.search_runs([experiment])
    arm_runs = {
        r.data.tags["arm"]: r for r in runs if "arm" in r.data.tags and "dsv3.stage" not in r.data.tags
    }
    assert set(arm_runs) == set(SWITCHES) and arm_runs["mtp-off"].data.tags["ablation"] == "mtp"
    assert 0 <= arm_runs["mtp-on"].data.metrics["mtp_acceptance_rate"] <= 1
    assert "mtp_acceptance_rate" not in arm_runs["mtp-off"].data.metrics
    assert arm_runs["mtp-on"].data.tags["dsv3.reused.pretrain"] == free.mlflow_run_id

    again = ablations(recipes_dir=str(recipes), runs_dir=str(runs_dir), acceptance=(2, 16, 8))
    assert again.read_text() == text  # the same measurements, read from the same finished runs
    assert len(_stage_runs(client, experiment)) == len(stage_runs)  # no stage ran again


def claim_rows_from(text: str) -> list[list[str]]:
    """The rows of the markdown claims table as cells."""
    section = text.split("## Claims", 1)[1].split("## Arms", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]
