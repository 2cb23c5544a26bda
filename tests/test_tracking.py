"""MLflow tracking: the store's location, nested runs, and the environment a stage logs through."""

import os
import time
from pathlib import Path

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


def test_a_model_folder_is_a_new_registered_version_and_latest_loads_it(tmp_path):
    import mlflow

    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    client = MlflowClient(tracker.uri)
    client.create_registered_model("dsv3-smoke-sft")  # as older code left it: no description, no tags
    versions = []
    for attempt in ("a", "b"):
        (tmp_path / attempt).mkdir()
        (tmp_path / attempt / "config.json").write_text(attempt)
        with tracker.stage_run("sft", {}) as run_id:
            versions.append(tracker.register_model(
                run_id, "dsv3-smoke-sft", tmp_path / attempt, {"dsv3.stage_key": attempt}, description=f"run {attempt}",
                model_description=f"sft models ({attempt})", model_tags={"dsv3.stage": "sft"},
            ))  # fmt: skip
    assert versions == [1, 2]
    version = client.get_model_version("dsv3-smoke-sft", "2")
    assert version.run_id == run_id and version.tags == {"dsv3.stage_key": "b"} and version.description == "run b"
    assert client.get_model_version("dsv3-smoke-sft", "1").description == "run a"
    model = client.get_registered_model("dsv3-smoke-sft")  # what the UI's model list and model page show
    assert model.description == "sft models (b)" and model.tags == {"dsv3.stage": "sft"}
    mlflow.set_registry_uri(tracker.uri)
    latest = mlflow.artifacts.download_artifacts("models:/dsv3-smoke-sft/latest", dst_path=str(tmp_path / "got"))
    assert (Path(latest) / "config.json").read_text() == "b"


def test_datasets_are_run_inputs_with_digest_source_and_context(tmp_path):
    import datasets

    from dsv3.store import StageData

    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello")
    data = {
        "train": StageData(datasets.Dataset.from_dict({"text": ["a", "b"]}), str(corpus)),
        "prompts": StageData(datasets.Dataset.from_dict({"prompt": ["c"]}), "dsv3.data.math_tasks.rl_example", "evaluation"),
    }
    with tracker.stage_run("rl", {}) as run_id:
        tracker.log_datasets(run_id, data)
    inputs = {d.dataset.name: d for d in MlflowClient(tracker.uri).get_run(run_id).inputs.dataset_inputs}
    assert set(inputs) == {"train", "prompts"}
    train, prompts = inputs["train"], inputs["prompts"]
    assert train.dataset.digest and train.dataset.digest != prompts.dataset.digest
    assert corpus.as_uri() in train.dataset.source and "rl_example" in prompts.dataset.source
    assert {t.key: t.value for t in prompts.tags}["mlflow.data.context"] == "evaluation"
    assert '"num_rows": 2' in train.dataset.profile


def test_system_metrics_are_sampled_into_the_stage_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    with tracker.stage_run("pretrain", {}) as run_id, tracker.system_metrics(run_id):
        time.sleep(1.0)
    metrics = MlflowClient(tracker.uri).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


@pytest.mark.parametrize("signal_error", ["keyboard", "sigterm", "prefect-cancel"])
def test_an_interrupted_run_is_killed_with_its_reason(tmp_path, signal_error):
    """Ctrl-C, SIGTERM (dsv3.errors.Interrupted) and a cancel from Prefect (its TerminationSignal) end the stage run
    and its parent KILLED, saying so in the description; a failed check ends them FAILED with the check's line."""
    from prefect.exceptions import TerminationSignal

    from dsv3.errors import Interrupted, StageFailed

    error = {"keyboard": KeyboardInterrupt(), "sigterm": Interrupted(), "prefect-cancel": TerminationSignal(15)}[signal_error]
    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    with pytest.raises(type(error)), tracker.pipeline_run("p") as parent, tracker.stage_run("pretrain", {}) as run_id:
        raise error
    client = MlflowClient(tracker.uri)
    for run in (client.get_run(run_id), client.get_run(parent)):
        assert run.info.status == "KILLED"
        assert run.data.tags["dsv3.failure"].startswith("interrupted") and run.data.tags["mlflow.note.content"]
    with pytest.raises(StageFailed), tracker.stage_run("reward", {}) as run_id:
        raise StageFailed("stage reward failed its health check checks.reward.min_pair_accuracy: measured 0.5955")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and "measured 0.5955" in run.data.tags["mlflow.note.content"]


def test_params_respect_mlflow_limits(tmp_path):
    """Hundreds of params (more than one log_batch takes) and a value longer than MLflow's limit are all logged."""
    from dsv3.tracking import MAX_PARAM_LENGTH

    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    params = {f"section.key{i}": i for i in range(250)} | {"data.paths": "x" * (MAX_PARAM_LENGTH + 10)}
    with tracker.pipeline_run("p", params=params) as run_id:
        pass
    logged = MlflowClient(tracker.uri).get_run(run_id).data.params
    assert len(logged) == 251 and logged["section.key249"] == "249" and len(logged["data.paths"]) == MAX_PARAM_LENGTH


def test_a_parent_run_is_reopened_only_for_the_same_name_and_params(tmp_path):
    tracker = Tracker(tmp_path / "runs", experiment="dsv3-test")
    with pytest.raises(RuntimeError), tracker.pipeline_run("smoke/a", params={"lr": 1}, reopen=True) as first:
        raise RuntimeError("boom")
    with tracker.pipeline_run("smoke/a", params={"lr": 1}, reopen=True) as again:
        pass
    with tracker.pipeline_run("smoke/a", params={"lr": 2}, reopen=True) as other:
        pass
    run = MlflowClient(tracker.uri).get_run(first)
    assert again == first and other != first
    assert run.info.status == "FINISHED" and "dsv3.failure" not in run.data.tags  # last time's failure cleared
    assert run.data.tags["dsv3.pipeline_runs"] == "2"
