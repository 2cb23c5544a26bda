"""The Prefect flow end to end on the smoke recipe: runs, skips on rerun without rewriting, rebuilds
a deleted output, and records one parent and one nested MLflow run per stage that ran."""

import os
import shutil
import sysconfig
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dsv3.cli import main
from dsv3.config import flatten, load_recipe
from dsv3.store.manifest import read_manifest
from dsv3.store.runner import code_version
from dsv3.store.runs import run_root
from dsv3.tracking import tracking_uri
from flows.pipeline import pipeline, stages_to_run
from flows.runtime import prefect_api
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
    assert len(parents) == 1 and len(nested) == 1  # one parent per variant, no duplicate stage run
    assert parents[0].data.tags["dsv3.reused.tokenizer"] == stage_run.info.run_id
    assert parents[0].data.tags["dsv3.pipeline_runs"] == "2" and parents[0].info.status == "FINISHED"

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


def test_the_launch_form_offers_the_stages_and_a_served_run_accepts_them():
    """`until` is a dropdown of the stage names in the deployment's parameter schema, and the flow as a served run
    gets it (pickled by value, with only the globals its code names) still validates its parameters."""
    import cloudpickle
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from dsv3.config import STAGE_ORDER

    until = parameter_schema(pipeline).model_dump()["properties"]["until"]
    assert {"enum": list(STAGE_ORDER), "type": "string"} in until["anyOf"] and until["default"] is None
    assert until["description"].startswith("the last stage to run")
    served = cloudpickle.loads(cloudpickle.dumps(pipeline))
    assert served.fn is not pipeline.fn  # by value, as the runner sends it to its subprocess
    assert served.validate_parameters({"recipe_path": SMOKE, "until": "tokenizer"})["until"] == "tokenizer"
    assert served.validate_parameters({"recipe_path": SMOKE})["until"] is None
    with pytest.raises(ParameterTypeError, match="until"):
        served.validate_parameters({"recipe_path": SMOKE, "until": "tokeniser"})


def test_the_graph_draws_the_stage_inputs_and_a_reused_stage_as_cached(runs_dir):
    """In Prefect, pretrain's task waits on tokenizer's (its input) and on nothing else — no edge through a shared
    argument — and a rerun's tasks end Completed in a state named Cached, not as if they had run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import REUSED_STATE
    from flows.runtime import _flush_to_server

    def task_runs(client, flow_run_id) -> dict:
        """name -> task run, once both have reached a final state (the states arrive as events)."""
        only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        for _ in range(60):
            runs = {r.name.rsplit("-", 1)[0]: r for r in client.read_task_runs(flow_run_filter=only)}
            if len(runs) == 2 and all(r.state and r.state.is_final() for r in runs.values()):
                return runs
            time.sleep(0.5)
        raise AssertionError(f"task runs not final: {runs}")

    with prefect_api(runs_dir):
        first = pipeline(recipe_path=SMOKE, until="pretrain", runs_dir=str(runs_dir), return_state=True)
        second = pipeline(recipe_path=SMOKE, until="pretrain", runs_dir=str(runs_dir), return_state=True)
        _flush_to_server()
        with get_client(sync_client=True) as client:
            ran = task_runs(client, first.state_details.flow_run_id)
            reused = task_runs(client, second.state_details.flow_run_id)
    assert [r["action"] for r in second.result()] == ["skipped", "skipped"]
    for runs in (ran, reused):
        tokenizer, pretrain = runs["stage-tokenizer"], runs["stage-pretrain"]
        assert [i.id for i in pretrain.task_inputs.get("wait_for", [])] == [tokenizer.id]
        assert not any(tokenizer.task_inputs.values())
        assert not any(inputs for name, inputs in pretrain.task_inputs.items() if name != "wait_for")
    assert {r.state.name for r in ran.values()} == {"Completed"}
    assert {r.state.name for r in reused.values()} == {REUSED_STATE} and all(r.state.is_completed() for r in reused.values())


def test_a_failed_check_fails_the_flow_and_runs_nothing_after_it(runs_dir, capsys):
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
    reason = "checks.tokenizer.min_bytes_per_token: measured "
    for run in (parents[0], nested[0]):  # the reason, where MLflow shows it: description and a tag
        assert reason in run.data.tags["dsv3.failure"] and reason in run.data.tags["mlflow.note.content"]
    assert parents[0].data.tags["dsv3.failure"].startswith("stage tokenizer failed")
    assert parents[0].data.metrics["tokenizer/bytes_per_token_validation"] > 1  # the failed stage's numbers too
    main(["runs", "--runs-dir", str(runs_dir)])
    assert f"tokenizer: failed ({reason}" in capsys.readouterr().out


def test_a_parent_run_holds_every_recipe_value_its_recipe_and_commit_and_links_to_the_ui(runs_dir):
    """MLflow's compare view reads params: every resolved value is one, not only the overrides; the Prefect link
    points at the UI `make ui` serves, not at the server `dsv3 run` started and stopped."""
    with prefect_api(runs_dir):
        pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir), name="a")
    (parent,), _ = _runs(runs_dir)
    recipe = load_recipe(SMOKE, [], "a")
    for key, value in flatten(recipe).items():
        if key not in ("name", "variant", "overrides"):
            assert parent.data.params[key] == str(value), key
    assert parent.data.params["pretrain.lr_peak"] == str(recipe.pretrain.lr_peak)  # never overridden, still there
    resolved = MlflowClient(tracking_uri(runs_dir)).download_artifacts(parent.info.run_id, "recipe.yaml")
    assert yaml.safe_load(Path(resolved).read_text()) == recipe.model_dump(mode="json")
    assert parent.data.tags["mlflow.source.git.commit"] == code_version()
    assert parent.data.tags["prefect.flow_run_url"].startswith("http://127.0.0.1:4200/flow-runs/flow-run/")


def test_a_reused_stage_is_linked_under_every_parent_that_uses_it(runs_dir):
    pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir), name="a")
    pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir), name="b", overrides=["pretrain.lr_peak=0.001"])
    parents, nested = _runs(runs_dir)
    a, b = sorted(parents, key=lambda r: r.info.run_name)
    stage_run, link = nested  # b's tokenizer is a's: no second training, a link run under b
    assert stage_run.data.tags["mlflow.parentRunId"] == a.info.run_id and stage_run.data.tags["dsv3.stage"] == "tokenizer"
    assert link.data.tags["mlflow.parentRunId"] == b.info.run_id and link.info.run_name == "tokenizer (reused)"
    assert link.data.tags["dsv3.reused_run"] == stage_run.info.run_id and stage_run.info.run_id in link.data.tags["mlflow.note.content"]
    assert link.data.metrics == stage_run.data.metrics
    assert b.data.params["pretrain.lr_peak"] == "0.001" and a.data.params["pretrain.lr_peak"] != "0.001"
    pipeline(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir), name="b", overrides=["pretrain.lr_peak=0.001"])
    assert [len(runs) for runs in _runs(runs_dir)] == [2, 2]  # rerun: the same parent, the same link


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
                   "params.overrides", "params.recipe_digest", "params.set.tokenizer.vocab_size",
                   "params.pretrain.lr_peak", "tags.dsv3.code_version", "tags.prefect.flow_run_id",
                   "tags.dsv3.run_folder"):  # fmt: skip
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
        assert (runs_dir / v.tags["dsv3.stage_folder"]).resolve().as_uri() + "/model" == v.source and v.tags["dsv3.stage_key"]
        # the UI's version page and versions table: which run, which folder, the headline numbers
        assert v.description.startswith(f"Run {v.tags['dsv3.run_folder']}, stage pretrain (folder {v.tags['dsv3.stage_folder']}, ")
        assert "final_val_loss " in v.description
    model = client.get_registered_model("dsv3-smoke-pretrain")
    assert model.tags == {"dsv3.recipe": "smoke", "dsv3.stage": "pretrain"}
    assert model.description.startswith("Pretraining stage of the dsv3 recipe `smoke`")
    assert "models:/dsv3-smoke-pretrain/latest" in model.description
    assert client.search_registered_models("name = 'dsv3-smoke-tokenizer'") == []  # a tokenizer is no model
