"""The Prefect flow end to end on the smoke recipe: runs, skips on rerun without rewriting, rebuilds
a deleted output, and records one parent and one nested MLflow run per stage that ran."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dsv3.config import load_recipe
from dsv3.stages.manifest import read_manifest
from dsv3.tracking import tracking_uri
from flows.pipeline import pipeline, stages_to_run
from tests.conftest import RECIPES

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
    tokenizer_dir = runs_dir / "smoke" / "tokenizer"
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
    assert read_manifest(runs_dir / "smoke" / "tokenizer").status == "failed"
    assert not (runs_dir / "smoke" / "pretrain").exists()
    report = (runs_dir / "smoke" / "report.md").read_text()
    assert "**failed**: stage tokenizer failed its health check" in report
    assert 'class="bad"' in (runs_dir / "smoke" / "report.html").read_text()
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
    bomb = pickle.dumps(_Bomb(str(marker)))
    planted = [home / "storage" / "result", runs_dir / "smoke" / "tokenizer" / "result.pickle"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bomb)
    second = pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir))
    assert [r["action"] for r in second] == ["skipped"]
    assert not marker.exists()


class _Bomb:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
