"""MLflow tracking: the store's location, nested runs, and the environment a stage logs through."""

import os

import pytest
from mlflow.tracking import MlflowClient

from dsv3.tracking import Tracker, stage_run, tracking_uri


def test_default_uri_is_sqlite_in_runs_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path / "runs") == f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path / "runs") == "http://127.0.0.1:5000"


def test_nested_stage_run_and_environment(tmp_path):
    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    assert stage_run() is None
    with tracker.pipeline_run("pipeline-test") as parent:
        with tracker.stage_run(
            "tokenizer", {"tokenizer.vocab_size": 512, "data.paths": ["a", "b"]}
        ) as run_id:
            assert stage_run() == (tracker.uri, run_id)
            assert os.environ["MLFLOW_RUN_ID"] == run_id
            tracker.log_metrics(run_id, {"bytes_per_token": 3.5})
        assert stage_run() is None
        with pytest.raises(RuntimeError), tracker.stage_run("pretrain", {}):
            raise RuntimeError("stage crashed")
    client = MlflowClient(tracker.uri)
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params == {"tokenizer.vocab_size": "512", "data.paths": "['a', 'b']"}
    assert run.data.metrics == {"bytes_per_token": 3.5}
    assert run.info.status == "FINISHED"
    failed = [r for r in client.search_runs([tracker.experiment_id]) if r.info.run_name == "pretrain"]
    assert failed[0].info.status == "FAILED"
    assert client.get_run(parent).info.status == "FINISHED"


def test_fluent_api_follows_the_stage_store(tmp_path, monkeypatch):
    """Libraries that log through mlflow's fluent API (transformers' MLflowCallback resumes MLFLOW_RUN_ID with
    mlflow.start_run) find the stage run even after something in the process pinned another store globally."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # an earlier stage's callback pinned it
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # ...and that stage's Tracker restored the environment
    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    with tracker.stage_run("sft", {}) as run_id:
        with mlflow.start_run():
            mlflow.log_metric("loss", 1.0)
    assert MlflowClient(tracker.uri).get_run(run_id).data.metrics == {"loss": 1.0}
