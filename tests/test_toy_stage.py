"""A stage added in one file: this module declares a toy stage (`STAGE` below, as a plugin's module would) with its own
recipe section `toy:` and check `checks.toy.min_tokens`, registers it and runs it through the Prefect pipeline flow
after the real tokenizer stage — run, skipped on rerun, rerun when its section changes, its headline metric on the
MLflow parent run and its check judged (docs/design.md, "Stages")."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pydantic import Field
from tokenizers import Tokenizer

from dsv3.config import RecipeError, Section, load_recipe
from dsv3.errors import StageFailed
from dsv3.stages import register, run_stage, unregister
from dsv3.store import Stage, StageResult, metric
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root, variant_name
from dsv3.tracking import tracking_uri
from flows.pipeline import pipeline
from tests.conftest import RECIPES

OUTPUT = "count.json"


class ToySection(Section):
    """The toy stage's recipe section, `toy:`."""

    sentence: str = Field("def toy(stage):\n    return stage * 2\n", description="what it counts tokens of")


class ToyChecks(Section):
    """Its thresholds, `checks.toy:`."""

    min_tokens: int | None = Field(1, ge=0, description="tokens the sentence must have")


def run(recipe, workdir: Path, inputs: dict[str, Path]) -> StageResult:
    """Count the tokens of the recipe's sentence with the tokenizer stage's tokenizer."""
    tokenizer = Tokenizer.from_file(str(inputs["tokenizer"] / "tokenizer" / "tokenizer.json"))
    tokens = len(tokenizer.encode(recipe.toy.sentence).ids)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / OUTPUT).write_text(json.dumps({"tokens": tokens, "seq_len": recipe.data.seq_len}))
    return StageResult(outputs=[OUTPUT], metrics={"toy_tokens": tokens, "toy_seq_len": recipe.data.seq_len})


STAGE = Stage(
    name="toy",
    run=run,
    sections=("data", "tokenizer", "toy"),
    inputs=("tokenizer",),
    outputs=(OUTPUT,),
    checks={"min_tokens": metric("toy_tokens")},
    headline=("toy_tokens",),
    section=ToySection,
    checks_section=ToyChecks,
    section_on_by_default=True,
)
STAGES = ["pipeline.stages=[tokenizer,toy]"]


@pytest.fixture
def toy():
    register(STAGE)
    yield STAGE
    unregister(STAGE.name)


def run_flow(runs_dir: Path, overrides: list[str]) -> list[tuple[str, str]]:
    results = pipeline(recipe_path=str(RECIPES / "smoke.yaml"), overrides=overrides, runs_dir=str(runs_dir))
    return [(r["stage"], r["action"]) for r in results]


def test_a_stage_declared_in_one_file_runs_through_the_flow(toy, runs_dir):
    assert run_flow(runs_dir, STAGES) == [("tokenizer", "ran"), ("toy", "ran")]
    recipe = load_recipe(RECIPES / "smoke.yaml", STAGES)
    workdir = run_root(runs_dir, recipe) / "toy"
    manifest = read_manifest(workdir)
    assert manifest.status == "completed" and list(manifest.outputs) == [OUTPUT]
    assert [c["name"] for c in manifest.checks] == ["toy.nonfinite_losses", "checks.toy.min_tokens"]
    assert json.loads((workdir / OUTPUT).read_text())["seq_len"] == 64

    assert run_flow(runs_dir, STAGES) == [("tokenizer", "skipped"), ("toy", "skipped")]
    client = MlflowClient(tracking_uri(runs_dir))
    (parent,) = [
        r for r in client.search_runs([client.get_experiment_by_name("dsv3-smoke").experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]  # fmt: skip
    assert parent.data.metrics["toy/toy_tokens"] == manifest.metrics["toy_tokens"] > 0
    card = (run_root(runs_dir, recipe) / "report.md").read_text()  # on the report card like a built-in stage
    (row,) = [line for line in card.splitlines() if line.startswith("| [toy](#stage-toy) | completed |")]
    assert "toy_tokens" in row and "## Stage: toy" in card

    edited = STAGES + ["toy.sentence=a b"]  # its section is in its key: it reruns, the tokenizer does not
    assert run_flow(runs_dir, edited) == [("tokenizer", "skipped"), ("toy", "ran")]
    rerun = read_manifest(run_root(runs_dir, load_recipe(RECIPES / "smoke.yaml", edited)) / "toy")
    assert rerun.key.recipe_hash != manifest.key.recipe_hash
    assert rerun.metrics["toy_tokens"] < manifest.metrics["toy_tokens"]

    strict = load_recipe(RECIPES / "smoke.yaml", STAGES + ["checks.toy.min_tokens=1000"])  # judged, not rerun
    assert run_stage("tokenizer", strict, runs_dir).action == "skipped"
    failed = r"^stage toy failed its health check checks\.toy\.min_tokens: measured \d+, needs ≥ 1000$"
    with pytest.raises(StageFailed, match=failed):
        run_stage("toy", strict, runs_dir)


def test_a_registered_stage_renames_no_run_that_does_not_use_it():
    without = variant_name(load_recipe(RECIPES / "smoke.yaml"))
    register(STAGE)
    try:
        assert variant_name(load_recipe(RECIPES / "smoke.yaml")) == without
        assert variant_name(load_recipe(RECIPES / "smoke.yaml", STAGES)) != without
    finally:
        unregister(STAGE.name)


def test_its_section_is_validated_like_a_built_in_one(toy):
    with pytest.raises(RecipeError, match=r"^toy\.colour: unknown key \(allowed: sentence\)$"):
        load_recipe(RECIPES / "smoke.yaml", ["toy.colour=red"])
    with pytest.raises(RecipeError, match=r"^checks\.toy\.min_tokens: "):
        load_recipe(RECIPES / "smoke.yaml", ["checks.toy.min_tokens=-1"])


def test_an_unregistered_stage_and_its_section_are_refused_in_one_line():
    with pytest.raises(RecipeError, match="pipeline.stages: toy is not a stage"):
        load_recipe(RECIPES / "smoke.yaml", STAGES)
    with pytest.raises(RecipeError, match=r"^toy: unknown key \(allowed: "):
        load_recipe(RECIPES / "smoke.yaml", ["toy.sentence=a"])
    with pytest.raises(RecipeError, match=r"^checks\.toy: unknown key \(allowed: "):
        load_recipe(RECIPES / "smoke.yaml", ["checks.toy.min_tokens=1"])
