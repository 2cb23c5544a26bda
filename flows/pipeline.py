"""The pipeline as a Prefect flow: one task per stage, in the recipe's order.

Pure wiring of `dsv3.stages`: the runner decides skip / resume / rerun from each stage's manifest; this flow
adds Prefect's view of it — retries from the recipe, a cache keyed on the manifest hashes (so a finished
stage is not even entered in a later flow run, but only while its outputs are intact), and a markdown
artifact per stage with its metrics; at the end, the run's report card (`dsv3.report`) as a Prefect artifact
and as files of the MLflow parent run. It runs with no Prefect server (ephemeral mode); when `make ui` has
a server up, the same runs show there.

    python flows/pipeline.py --recipe recipes/tiny.yaml [--until tokenizer] [--set key=value ...]
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

# Before Prefect reads its settings: the temporary (ephemeral) server can take longer than Prefect's 20 s
# to start on a busy 2-core laptop, and its telemetry heartbeat only adds sqlite lock contention.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402

from dsv3.config import Recipe, flatten, load_recipe
from dsv3.report import report_markdown, write_report
from dsv3.stages.manifest import is_trusted, read_manifest
from dsv3.stages.runner import StageInputError, code_version, run_root, run_stage, stage_key
from dsv3.tracking import Tracker


def manifest_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The stage's key and output hash while its manifest is trusted; None (no cache) otherwise.

    Prefect's default cache lives for one flow run; this one spans runs, and a deleted or corrupted output
    changes the answer to None, so the task runs again instead of returning a stale cached result.
    """
    recipe = Recipe.model_validate(parameters["recipe"])
    root = run_root(parameters["runs_dir"], recipe)
    name = parameters["stage"]
    try:
        key = stage_key(name, recipe, root)
    except StageInputError:
        return None
    manifest = read_manifest(root / name)
    if not is_trusted(manifest, key, root / name):
        return None
    return f"dsv3-{recipe.name}-{name}-{key.digest()[:24]}-{manifest.output_hash[:24]}"


def run_and_publish(stage: str, recipe: Recipe, runs_dir: str, tracker: Tracker, description: str) -> dict[str, Any]:
    """Run one stage through the manifest runner (tracked by `tracker`) and publish its Prefect markdown
    artifact; returns what a stage task returns."""
    outcome = run_stage(stage, recipe, runs_dir, tracker)
    m = outcome.manifest
    create_markdown_artifact(
        key=artifact_key(f"{recipe.name}-{stage}"),
        markdown=stage_markdown(
            stage, outcome.action, outcome.workdir, m.metrics, m.mlflow_run_id, outcome.summary
        ),
        description=description,
    )
    return {
        "stage": stage,
        "action": outcome.action,
        "workdir": str(outcome.workdir),
        "metrics": m.metrics,
        "mlflow_run_id": m.mlflow_run_id,
        "parent_run_id": tracker.parent_id,
    }


@task(cache_key_fn=manifest_cache_key, persist_result=True)
def stage_task(
    stage: str, recipe: dict[str, Any], runs_dir: str, parent_run_id: str | None
) -> dict[str, Any]:
    """Run one stage through the manifest runner, inside the pipeline's MLflow parent run."""
    parsed = Recipe.model_validate(recipe)
    tracker = Tracker(runs_dir, experiment=f"dsv3-{parsed.name}")
    tracker.parent_id = parent_run_id
    result = run_and_publish(stage, parsed, runs_dir, tracker, f"{stage} stage of recipe {parsed.name}")
    get_run_logger().info("%s: %s in %s", stage, result["action"], result["workdir"])
    return result


@flow(name="dsv3-pipeline", log_prints=False)  # True would break dill's capture of dis output
def pipeline(
    recipe_path: str = "recipes/tiny.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
    runs_dir: str = "runs",
) -> list[dict[str, Any]]:
    """tokenizer → pretrain → extend → sft → reward → rl, as far as the recipe (or `until`) says."""
    recipe = load_recipe(recipe_path, overrides or [])
    stages = stages_to_run(recipe, until)
    tracker = Tracker(runs_dir, experiment=f"dsv3-{recipe.name}")
    logger = get_run_logger()
    results = []
    tags = {
        "dsv3.recipe": recipe.name,
        "dsv3.recipe_path": str(recipe_path),
        "dsv3.code_version": code_version(),
    }
    with tracker.pipeline_run(f"pipeline-{recipe.name}", tags=tags) as parent_id:
        tracker.log_params(parent_id, flatten(recipe.pipeline, "pipeline") | {"seed": recipe.seed})
        for stage in stages:
            started = time.time()
            task_with_options = stage_task.with_options(
                name=f"stage-{stage}",
                retries=recipe.pipeline.retries,
                retry_delay_seconds=recipe.pipeline.retry_delay_s,
            )
            result = task_with_options(stage, recipe.model_dump(mode="json"), str(runs_dir), parent_id)
            if result["parent_run_id"] != parent_id:  # a Prefect cache hit: the body did not run
                result = result | {"action": "skipped"}
                tracker.mark_reused(stage, result["mlflow_run_id"])
            result["seconds"] = time.time() - started
            logger.info(
                "%-10s %-8s %7.1fs  -> %s", stage, result["action"], result["seconds"], result["workdir"]
            )
            results.append(result)
        if stages:
            logger.info("report:  %s", publish_report(run_root(runs_dir, recipe), tracker, parent_id))
    logger.info("outputs: %s", run_root(runs_dir, recipe))
    logger.info("MLflow:  %s (parent run %s); `make ui` to browse", tracker.uri, parent_id)
    return results


def stages_to_run(recipe: Recipe, until: str | None) -> list[str]:
    stages = list(recipe.pipeline.stages)
    if until is None:
        return stages
    if until not in stages:
        raise ValueError(
            f"--until {until}: not a stage of recipe {recipe.name} (stages: {', '.join(stages)})"
        )
    return stages[: stages.index(until) + 1]


def publish_report(run_dir: Path, tracker: Tracker, parent_run_id: str) -> Path:
    """Write the report card, show it as a Prefect markdown artifact, attach both files to the parent run."""
    md_path, html_path = write_report(run_dir)
    create_markdown_artifact(
        key=artifact_key(f"{run_dir.name}-report"),
        markdown=report_markdown(run_dir, link_plots=False),
        description=f"report card of {run_dir}; {html_path.name} there has the plots",
    )
    for path in (md_path, html_path):
        tracker.log_artifact(parent_run_id, path)
    return html_path


def artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def stage_markdown(
    stage: str, action: str, workdir: Path, metrics: dict, run_id: str | None, summary: str
) -> str:
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()))
    return (
        f"# Stage `{stage}` — {action}\n\nOutputs: `{workdir}`  \nMLflow run: `{run_id}`\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n{summary}\n"
    )


if __name__ == "__main__":
    from dsv3.cli import main

    main(["run", *__import__("sys").argv[1:]])
