"""The pipeline over seeds: `dsv3 run --seeds N` / `make pipeline SEEDS=N`.

Seed i of N runs the pipeline flow (as a subflow) on the recipe with `--set seed=<s0 + i>` (s0 = the recipe's seed;
seed s0 itself is the recipe as given, so `--seeds 3` after a plain `make pipeline` reuses that run), each in its
own run folder; stages whose keys match — the same seed, data and code — are reused from the stage store, so a
rerun or `--seeds 5` after `--seeds 3` trains only what is new. A seed that fails does not stop the others; the
flow fails at the end, naming it.

Then the table of every stage's headline metrics as mean ± sd with the per-seed values and the RL-over-SFT paired
difference (dsv3.seeds_report) goes to runs/<recipe>/seeds-<variant>/seeds.md and .html, a Prefect markdown
artifact, and an MLflow run `<recipe>/seeds` (params: seeds, overrides; metrics `<stage>/<metric>/mean` and `/sd`;
the table as artifacts) under which each seed's pipeline run is nested.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Failed

from dsv3.config import load_recipe
from dsv3.seeds_report import metric_rows, read_seed_run, rl_gain, write_seeds_report
from dsv3.store.lock import runs_lock
from dsv3.store.runs import run_root, variant_name
from dsv3.tracking import Tracker
from flows.pipeline import flow_run_name, pipeline, stages_to_run


def seed_overrides(overrides: list[str], name: str | None, seed0: int, index: int) -> tuple[list[str], str | None]:
    """The overrides and variant name of the index-th seed: as given for 0, else with seed=<s0 + index> (a --name
    gets a -seed=<s> suffix so the seeds' folders differ)."""
    if index == 0:
        return list(overrides), name
    seed = seed0 + index
    return [*overrides, f"seed={seed}"], (f"{name}-seed={seed}" if name else None)


def seeds_folder(runs_dir: str, recipe) -> Path:
    """runs/<recipe>/seeds-<variant of seed s0>/: where the table goes."""
    return run_root(runs_dir, recipe).parent / f"seeds-{variant_name(recipe)}"


def seeds_flow_run_name() -> str:
    """`<recipe>-<variant>-seeds<N>-<time>`."""
    return flow_run_name(f"seeds{flow_run.parameters.get('seeds', 3)}")


@flow(name="dsv3-pipeline-seeds", flow_run_name=seeds_flow_run_name, log_prints=False, persist_result=False)
def pipeline_over_seeds(
    recipe_path: str = "recipes/tiny.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
    runs_dir: str = "runs",
    name: str | None = None,
    seeds: int = 3,
) -> dict[str, Any]:
    """Run the pipeline for seeds s0 .. s0+seeds-1, then write and publish the table over them; returns
    {"report": seeds.md, "failed": [...]}, or a Failed state naming the seeds that failed."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: run at least one seed")
    logger = get_run_logger()
    recipe = load_recipe(recipe_path, overrides or [], name)
    stages_to_run(recipe, until)  # a bad --until fails before anything runs
    overrides = list(overrides or [])
    command = f"dsv3 run --recipe {recipe_path} --seeds {seeds}" + "".join(f" --set {o}" for o in overrides)
    tracker = Tracker(runs_dir, experiment=f"dsv3-{recipe.name}")
    runs, failed = [], []
    with runs_lock(Path(runs_dir), command), tracker.pipeline_run(
        f"{recipe.name}/{variant_name(recipe)}/seeds", tags={"dsv3.recipe": recipe.name, "dsv3.seeds": str(seeds)}
    ) as top_id:
        tracker.log_params(top_id, {"seeds": seeds, "seed0": recipe.seed, "overrides": " ".join(overrides) or "(none)"})
        for index in range(seeds):
            seeded_overrides, seeded_name = seed_overrides(overrides, name, recipe.seed, index)
            seeded = load_recipe(recipe_path, seeded_overrides, seeded_name)
            logger.info("seed %d (%d of %d): %s", seeded.seed, index + 1, seeds, run_root(runs_dir, seeded))
            state = pipeline(
                recipe_path=recipe_path,
                overrides=seeded_overrides,
                until=until,
                runs_dir=runs_dir,
                name=seeded_name,
                mlflow_parent_run=top_id,
                return_state=True,
            )
            if state.is_failed():
                outcome = state.result(raise_on_failure=False)
                kind = outcome["failure"]["kind"] if isinstance(outcome, dict) and "failure" in outcome else "crash"
                if kind == "interrupted":
                    raise KeyboardInterrupt
                failed.append(f"seed {seeded.seed}: {state.message or 'failed'}")
                logger.error("seed %d failed: %s", seeded.seed, state.message)
            runs.append(read_seed_run(seeded.seed, run_root(runs_dir, seeded)))
        md, page = write_seeds_report(seeds_folder(runs_dir, recipe), runs, command)
        publish(tracker, top_id, runs, md, page)
        logger.info("seeds:   %s", page)
    if failed:
        message = f"{len(failed)} of {seeds} seeds failed ({'; '.join(failed)}); table: {md}"
        return Failed(message=message, data={"failure": {"kind": "check", "message": message}, "report": str(md)})
    return {"report": str(md), "failed": failed}


def publish(tracker: Tracker, run_id: str, runs, md: Path, page: Path) -> None:
    """Mean and sd of each metric on the seeds run, the table as its artifacts and a Prefect markdown artifact."""
    metrics = {}
    for row in metric_rows(runs):
        metrics[f"{row.stage}/{row.metric}/mean"] = row.mean
        if row.sd is not None:
            metrics[f"{row.stage}/{row.metric}/sd"] = row.sd
    gain = rl_gain(runs)
    if gain is not None:
        metrics["rl/gain_over_sft/mean"] = gain.mean
        if gain.sd is not None:
            metrics["rl/gain_over_sft/sd"] = gain.sd
    tracker.log_metrics(run_id, metrics)
    for path in (md, page):
        tracker.log_artifact(run_id, path)
    key = re.sub(r"[^a-z0-9-]+", "-", f"{md.parent.parent.name}-{md.parent.name}".lower()).strip("-")[:100]
    create_markdown_artifact(key=key, markdown=md.read_text(), description=f"the pipeline over seeds: {md}")
