"""flows/ablations.py and recipes/ablations/: each arm differs from its ablation's first arm in exactly its switch, the
FP8 arms are wide enough for 128-blocks to matter, and the flow on smoke-sized arms over two seeds — measured rows
with spreads for the pairs that ran, "missing" for the others, one pretraining shared where the keys match, per-seed
MLflow runs, per-layer MaxVio in the histories, and a rerun that starts no stage run."""

import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dsv3.ablation_report import ABLATIONS, ARMS, recipe_differences
from dsv3.config import flatten, load_recipe
from dsv3.fp8 import fp8_scaling
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import tracking_uri
from flows.ablations import EXPERIMENT, ablations, arm_seeds, load_arms, seed_variant, select_ablations
from tests.conftest import RECIPES

ABLATION_RECIPES = RECIPES / "ablations"


def _flat(stem: str) -> dict:
    return flatten(load_recipe(ABLATION_RECIPES / f"{stem}.yaml"))


def test_recipe_folder_holds_every_arm():
    assert sorted(p.stem for p in ABLATION_RECIPES.glob("*.yaml")) == sorted(ARMS)


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: a.name)
def test_arms_differ_in_their_switch_only(ablation):
    first, *others = (_flat(stem) for stem in ablation.arms)
    base = flatten(load_recipe(ABLATION_RECIPES / "base" / ("wide.yaml" if ablation.name == "fp8" else "tiny.yaml")))
    for other in others:
        diff = recipe_differences(first, other)
        assert ablation.switch in diff and set(diff) <= {ablation.switch, *ablation.also}
    for flat in (first, *others):  # overlays of the ablation's base: its seed, data and sizes; only the switch changed
        assert set(recipe_differences(flat, base)) <= {ablation.switch, *ablation.also}
        assert flat["pipeline.stages"] == ["tokenizer", "pretrain"] and flat["seed"] == 1234
    load_arms(ABLATION_RECIPES)  # checks every pair


def test_fp8_arms_span_several_blocks_per_row_and_weight():
    flat = _flat("fp8-wide")
    assert flat["model.hidden_size"] >= 512 and flat["model.moe_intermediate_size"] >= 256
    precisions = {s: _flat(s)["pretrain.precision"] for s in ABLATIONS[0].arms}
    assert precisions == {"fp8-wide": "fp8-blockwise", "fp8-wide-tensorwise": "fp8-tensorwise", "fp8-wide-bf16": "bf16-mixed"}
    assert fp8_scaling(precisions["fp8-wide-tensorwise"]) == "tensorwise"  # one scale per tensor: test_fp8_tensorwise.py


def test_seeds_are_variants_of_the_arm_recipes():
    arms = load_arms(ABLATION_RECIPES)
    assert arm_seeds(arms, list(arms), 3) == [1234, 1235, 1236]
    path, recipe = arms["loss-free"]
    assert seed_variant(path, recipe, 0) is recipe
    second = seed_variant(path, recipe, 2)
    assert second.seed == 1236 and second.overrides == ["seed=1236"]
    assert recipe_differences(flatten(recipe), flatten(second)) == {"seed": (1234, 1236), "overrides": ([], ["seed=1236"])}
    with pytest.raises(ValueError, match="at least one seed"):
        arm_seeds(arms, list(arms), 0)
    with pytest.raises(ValueError, match="--only mpt: not an ablation"):
        select_ablations(["mpt"])


def test_unknown_recipe_file_is_refused(tmp_path):
    (tmp_path / "fp16.yaml").write_text("name: x\n")
    with pytest.raises(ValueError, match="fp16.yaml: not an arm of any ablation; name the file one of fp8-wide"):
        load_arms(tmp_path)


SWITCHES = {  # loss-free without its partner: a half pair is missing, and mtp-on reuses its pretraining
    "loss-free": {"pretrain": {"balancing": "loss_free"}},
    "mtp-on": {"model": {"num_nextn_predict_layers": 1}},
    "mtp-off": {"model": {"num_nextn_predict_layers": 0}},
}
FEW_STEPS = {"steps": 4, "val_every_n_steps": 2, "checkpoint_every_n_steps": 4, "log_every_n_steps": 2}


def _stage_runs(client: MlflowClient, experiment_id: str) -> list:
    return [r for r in client.search_runs([experiment_id]) if "dsv3.stage" in r.data.tags]


@pytest.mark.slow
def test_flow_runs_arms_over_seeds_reuses_and_reports_missing(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for stem, switch in SWITCHES.items():  # smoke-sized arms with the real switches
        overlay = {"base": str(RECIPES / "smoke.yaml"), "name": f"t-{stem}"}
        overlay |= {"pipeline": {"stages": ["tokenizer", "pretrain"]}, "pretrain": dict(FEW_STEPS)}
        for section, values in switch.items():
            overlay[section] = overlay.get(section, {}) | values
        (recipes / f"{stem}.yaml").write_text(yaml.safe_dump(overlay))
    runs_dir = tmp_path / "runs"
    report = ablations(recipes_dir=str(recipes), runs_dir=str(runs_dir), seeds=2)
    text = report.read_text()

    rows = claim_rows_from(text)
    fp8, balancing, mtp = ([r[3:6] for r in rows if r[0] == a.title] for a in ABLATIONS)
    assert fp8 == [["missing", "missing", "missing"]] * 2 and balancing == [["missing", "missing", "missing"]] * 3
    assert re.fullmatch(r"\d\.\d{4} ± \d\.\d{4} vs \d\.\d{4} ± \d\.\d{4}", mtp[0][0])  # the loss, per arm
    assert mtp[0][1].endswith("(2 seeds)") and mtp[0][2] in ("yes", "no", "not resolved")
    assert re.fullmatch(r"\d+\.\d% ± \d+\.\d% \(2 seeds\)", mtp[1][1])  # the acceptance rate over seeds
    assert (report.parent / "mtp_curves.png").stat().st_size > 10_000
    assert not (report.parent / "fp8_curves.png").exists() and not (report.parent / "balancing_maxvio.png").exists()
    assert "n/a (no MTP module)" in text and "| 0 | 1 |" not in text
    assert (report.parent / "ablations.html").read_text().count("data:image/png;base64,") == 1

    # two seeds: the second a `seed=` variant of each arm; mtp-on is loss-free but for the name and reuses its
    # pretraining in both seeds; the history holds per-layer MaxVio (smoke: MoE layer 1)
    client = MlflowClient(tracking_uri(runs_dir))
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    stage_runs = _stage_runs(client, experiment)
    assert sorted(r.data.tags["dsv3.stage"] for r in stage_runs) == ["pretrain"] * 4 + ["tokenizer"] * 2
    for index in (0, 1):
        on, free = (
            read_manifest(run_root(runs_dir, seed_variant(str(recipes / f"{s}.yaml"), load_recipe(recipes / f"{s}.yaml"), index)) / "pretrain")
            for s in ("mtp-on", "loss-free")
        )
        assert on.mlflow_run_id == free.mlflow_run_id
    history = client.get_metric_history(free.mlflow_run_id, "train/maxvio_batch_layer1")
    assert history and client.get_metric_history(free.mlflow_run_id, "val/maxvio_global_layer1")
    runs = client.search_runs([experiment])
    arm_runs = {r.data.tags["arm"]: r for r in runs if "arm" in r.data.tags and "seed" not in r.data.tags}
    seed_runs = [r for r in runs if "seed" in r.data.tags and "dsv3.stage" not in r.data.tags]
    assert set(arm_runs) == set(SWITCHES) and len(seed_runs) == 6
    assert {r.data.params["seed"] for r in seed_runs} == {"0", "1"}  # smoke's seed 0, then 1
    assert all(r.data.tags["mlflow.parentRunId"] == arm_runs[r.data.tags["arm"]].info.run_id for r in seed_runs)
    on = arm_runs["mtp-on"].data.metrics
    assert on["seeds"] == 2 and 0 <= on["mtp_acceptance_rate_mean"] <= 1 and "final_val_loss_sd" in on
    assert "mtp_acceptance_rate_mean" not in arm_runs["mtp-off"].data.metrics

    again = ablations(recipes_dir=str(recipes), runs_dir=str(runs_dir), seeds=2)
    assert again.read_text() == text  # the same measurements, read from the same finished runs
    assert len(_stage_runs(client, experiment)) == len(stage_runs)  # no stage ran again


def claim_rows_from(text: str) -> list[list[str]]:
    """The rows of the markdown claims table as cells."""
    section = text.split("## Claims", 1)[1].split("## Arms", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]
