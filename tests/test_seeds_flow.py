"""flows/seeds.py on the smoke recipe: one run folder per seed, the table over them, nested MLflow runs."""

from mlflow.tracking import MlflowClient

from dsv3.config import load_recipe
from dsv3.store.manifest import read_manifest
from dsv3.store.runs import run_root
from dsv3.tracking import tracking_uri
from flows.seeds import pipeline_over_seeds, seed_overrides, seeds_folder
from tests.conftest import RECIPES

SMOKE = str(RECIPES / "smoke.yaml")


def test_seed_variants_keep_seed0_as_given():
    assert seed_overrides(["a=1"], None, 7, 0) == (["a=1"], None)
    assert seed_overrides(["a=1"], None, 7, 2) == (["a=1", "seed=9"], None)
    assert seed_overrides([], "mine", 7, 1) == (["seed=8"], "mine-seed=8")


def test_two_seeds_each_in_its_folder_with_the_table_and_nested_runs(runs_dir):
    result = pipeline_over_seeds(recipe_path=SMOKE, until="tokenizer", runs_dir=str(runs_dir), seeds=2)
    first, second = load_recipe(SMOKE, []), load_recipe(SMOKE, ["seed=1"])
    roots = [run_root(runs_dir, r) for r in (first, second)]
    manifests = [read_manifest(root / "tokenizer") for root in roots]
    assert all(m.status == "completed" for m in manifests) and roots[0] != roots[1]
    table = (seeds_folder(str(runs_dir), first) / "seeds.md").read_text()
    assert result["report"].endswith("seeds.md")
    assert "| tokenizer | bytes_per_token_validation |" in table and "| seed 0 | seed 1 |" in table
    values = [m.metrics["bytes_per_token_validation"] for m in manifests]
    assert f"{sum(values) / 2:.4g} ± " in table

    client = MlflowClient(tracking_uri(runs_dir))
    experiment = client.get_experiment_by_name("dsv3-smoke")
    runs = client.search_runs([experiment.experiment_id])
    (top,) = [r for r in runs if r.info.run_name.endswith("/seeds")]
    pipelines = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == top.info.run_id]
    assert len(pipelines) == 2
    assert top.data.metrics["tokenizer/bytes_per_token_validation/mean"] == sum(values) / 2
    assert "tokenizer/bytes_per_token_validation/sd" in top.data.metrics
