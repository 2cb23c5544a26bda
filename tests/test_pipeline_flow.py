"""The Prefect flow end to end on the smoke recipe: runs, skips on rerun without rewriting, rebuilds
a deleted output, and records one parent and one nested MLflow run per stage that ran."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dsv3.config import load_recipe
from dsv3.stages.manifest import read_manifest
from dsv3.stages.runs import run_root
from dsv3.tracking import tracking_uri
from flows.pipeline import pipeline, stages_to_run
from tests.conftest import RECIPES, pickle_bomb

SMOKE = str(RECIPES / "smoke.yaml")


def _runs(runs_dir):
    client = MlflowClient(tracking_uri(runs_dir))
    experiment = client.get_experiment_by_name("dsv3-smoke")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, nested


def test_flow_runs_skips_and_rebuilds(runs_dir):
    first = pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir))
    assert [r["action"] for r in first] == ["ran"]
    tokenizer_dir = run_root(runs_dir, load_recipe(SMOKE, [])) / "tokenizer"
    assert (tokenizer_dir / "tokenizer" / "tokenizer.json").is_file()
    mtime = (tokenizer_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns

    parents, nested = _runs(runs_dir)
    assert len(parents) == 1 and len(nested) == 1
    stage_run = nested[0]
    assert stage_run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert stage_run.data.params["tokenizer.vocab_size"] == "512"
    assert stage_run.data.params["data.seq_len"] == "64"
    assert stage_run.data.metrics["bytes_per_token_validation"] > 1.0
    assert stage_run.info.status == "FINISHED"
    assert read_manifest(tokenizer_dir).mlflow_run_id == stage_run.info.run_id
    (corpus,) = stage_run.inputs.dataset_inputs  # the documents it trained on, as a run input
    assert corpus.dataset.name == "corpus" and corpus.dataset.digest
    assert Path(sysconfig.get_paths()["stdlib"]).resolve().as_uri() in corpus.dataset.source  # smoke reads the stdlib

    second = pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir))
    assert [r["action"] for r in second] == ["skipped"]
    assert (tokenizer_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == mtime
    parents, nested = _runs(runs_dir)
    assert len(parents) == 2 and len(nested) == 1  # no duplicate stage run
    assert parents[1].data.tags["dsv3.reused.tokenizer"] == stage_run.info.run_id

    shutil.rmtree(tokenizer_dir / "tokenizer")
    third = pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir))
    assert [r["action"] for r in third] == ["ran"]
    assert (tokenizer_dir / "tokenizer" / "tokenizer.json").is_file()
    assert len(_runs(runs_dir)[1]) == 2


def test_until_must_be_a_stage_of_the_recipe():
    recipe = load_recipe(SMOKE, ["pipeline.stages=[tokenizer,pretrain]"])
    assert stages_to_run(recipe, None) == ["tokenizer", "pretrain"]
    assert stages_to_run(recipe, "tokenizer") == ["tokenizer"]
    with pytest.raises(ValueError, match="--until rl: not a stage of recipe smoke"):
        stages_to_run(recipe, "rl")


def test_a_failed_check_fails_the_flow_and_runs_nothing_after_it(runs_dir):
    state = pipeline(
        recipe_path=SMOKE,
        overrides=["checks.tokenizer.min_bytes_per_token=10"],
        until="pretrain",
        runs_dir=str(runs_dir),
        return_state=True,
    )
    assert state.is_failed()
    assert state.message.startswith("stage tokenizer failed its health check checks.tokenizer.min_bytes_per_token")
    root = run_root(runs_dir, load_recipe(SMOKE, ["checks.tokenizer.min_bytes_per_token=10"]))
    assert read_manifest(root / "tokenizer").status == "failed"
    assert not (root / "pretrain").exists()
    report = (root / "report.md").read_text()
    assert "**failed**: stage tokenizer failed its health check" in report
    assert 'class="bad"' in (root / "report.html").read_text()
    parents, nested = _runs(runs_dir)
    assert parents[0].info.status == "FAILED" and nested[0].info.status == "FAILED"
    assert nested[0].data.tags["dsv3.checks"] == "failed"


def test_nothing_under_runs_is_unpickled(runs_dir, tmp_path, monkeypatch):
    """Prefect persists no results (nothing for it to unpickle); a pickle planted where results or checkpoints
    would be is never executed: the rerun skips or refuses it, and the marker file stays absent."""
    pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir))
    home = Path(os.environ["PREFECT_HOME"])
    assert not (home / "storage").exists() or not any((home / "storage").rglob("*"))
    marker = tmp_path / "pwned"
    bomb = pickle_bomb(marker)
    planted = [home / "storage" / "result", run_root(runs_dir, load_recipe(SMOKE, [])) / "tokenizer" / "result.pickle"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bomb)
    second = pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir))
    assert [r["action"] for r in second] == ["skipped"]
    assert not marker.exists()



def test_mlflow_compares_two_pipeline_runs_by_their_parent_runs(runs_dir):
    """Two variants of smoke (a tokenizer override): their parent runs carry the stages' headline metrics, the
    overrides, the recipe digest, the code version and the Prefect flow run, as columns of one search_runs table;
    each stage run names the runs of its inputs."""
    import mlflow

    pipeline(recipe_path=SMOKE, until="pretrain", overrides=["pretrain.steps=4"], runs_dir=str(runs_dir))
    pipeline(recipe_path=SMOKE, until="pretrain", overrides=["pretrain.steps=4", "tokenizer.vocab_size=600"],
             runs_dir=str(runs_dir))  # fmt: skip
    mlflow.set_tracking_uri(tracking_uri(runs_dir))
    table = mlflow.search_runs(experiment_names=["dsv3-smoke"], filter_string="tags.`dsv3.variant` != ''")
    assert len(table) == 2
    for column in ("metrics.tokenizer/bytes_per_token_validation", "metrics.pretrain/final_val_loss",
                   "params.overrides", "params.recipe_digest", "params.code_version", "params.set.tokenizer.vocab_size",
                   "tags.prefect.flow_run_id", "tags.dsv3.run_folder"):  # fmt: skip
        assert column in table.columns and table[column].notna().any(), column
    assert set(table["params.overrides"]) == {"pretrain.steps=4", "pretrain.steps=4 tokenizer.vocab_size=600"}
    assert table["metrics.tokenizer/bytes_per_token_validation"].nunique() == 2
    client = MlflowClient(tracking_uri(runs_dir))
    experiment = client.get_experiment_by_name("dsv3-smoke")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    runs = client.search_runs([experiment.experiment_id])
    tokenizers = {r.info.run_id for r in runs if r.data.tags.get("dsv3.stage") == "tokenizer"}
    pretrains = [r for r in runs if r.data.tags.get("dsv3.stage") == "pretrain"]
    assert len(tokenizers) == len(pretrains) == 2
    assert {r.data.tags["dsv3.input.tokenizer"] for r in pretrains} == tokenizers  # each names its own input
    for run in pretrains:
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "validation"}
    # each pretraining's model is a version of one registered model, linked to its run, tagged with its folders
    versions = client.search_model_versions("name = 'dsv3-smoke-pretrain'")
    assert {v.run_id for v in versions} == {r.info.run_id for r in pretrains}
    assert {v.tags["dsv3.run_folder"] for v in versions} == set(table["tags.dsv3.run_folder"])
    for v in versions:
        assert Path(v.tags["dsv3.stage_folder"]).as_uri() + "/model" == v.source and v.tags["dsv3.stage_key"]
    assert client.search_registered_models("name = 'dsv3-smoke-tokenizer'") == []  # a tokenizer is no model
