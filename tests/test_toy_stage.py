"""A stage added in one file: this module declares a toy stage (`STAGE` below, as dsv3/stages/<name>.py would),
registers it and runs it through the Prefect pipeline flow after the real tokenizer stage — run, then skipped on
rerun, its headline metric on the MLflow parent run and its check judged (docs/design.md, "Stages")."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tokenizers import Tokenizer

from dsv3.config import load_recipe
from dsv3.stages import register, unregister
from dsv3.store import Stage, StageResult
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import tracking_uri
from flows.pipeline import pipeline
from tests.conftest import RECIPES

OUTPUT = "count.json"


def run(recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    """Count the tokens of a sentence with the tokenizer stage's tokenizer."""
    tokenizer = Tokenizer.from_file(str(inputs["tokenizer"] / "tokenizer" / "tokenizer.json"))
    tokens = len(tokenizer.encode("def toy(stage):\n    return stage * 2\n").ids)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / OUTPUT).write_text(json.dumps({"tokens": tokens, "seq_len": recipe.data.seq_len}))
    return StageResult(outputs=[OUTPUT], metrics={"toy_tokens": tokens, "toy_seq_len": recipe.data.seq_len})


STAGE = Stage(
    name="toy",
    run=run,
    sections=("data", "tokenizer"),
    inputs=("tokenizer",),
    outputs=(OUTPUT,),
    headline=("toy_tokens",),
)


@pytest.fixture
def toy():
    register(STAGE)
    yield STAGE
    unregister(STAGE.name)


def test_a_stage_declared_in_one_file_runs_through_the_flow(toy, runs_dir):
    overrides = ["pipeline.stages=[tokenizer,toy]"]
    first = pipeline(recipe_path=str(RECIPES / "smoke.yaml"), overrides=overrides, runs_dir=str(runs_dir))
    assert [(r["stage"], r["action"]) for r in first] == [("tokenizer", "ran"), ("toy", "ran")]
    recipe = load_recipe(RECIPES / "smoke.yaml", overrides)
    workdir = run_root(runs_dir, recipe) / "toy"
    manifest = read_manifest(workdir)
    assert manifest.status == "completed" and list(manifest.outputs) == [OUTPUT]
    assert [c["name"] for c in manifest.checks] == ["toy.nonfinite_losses"]
    assert json.loads((workdir / OUTPUT).read_text())["seq_len"] == 64

    again = pipeline(recipe_path=str(RECIPES / "smoke.yaml"), overrides=overrides, runs_dir=str(runs_dir))
    assert [r["action"] for r in again] == ["skipped", "skipped"]
    client = MlflowClient(tracking_uri(runs_dir))
    (parent,) = [
        r for r in client.search_runs([client.get_experiment_by_name("dsv3-smoke").experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]  # fmt: skip
    assert parent.data.metrics["toy/toy_tokens"] == manifest.metrics["toy_tokens"] > 0


def test_an_unregistered_stage_is_refused_in_one_line():
    with pytest.raises(ValueError, match="pipeline.stages: toy is not a stage"):
        load_recipe(RECIPES / "smoke.yaml", ["pipeline.stages=[tokenizer,toy]"])
