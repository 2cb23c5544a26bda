"""The pipeline as a Prefect flow: one task per stage, in the recipe's order.

Pure wiring of `dsv3.stages`: the runner decides skip / resume / rerun from each stage's manifest and judges its
health checks; this flow adds Prefect's view of it — a task per stage with the recipe's retries (for crashes
only: bad input and failed checks are not retried), waiting on the stages it reads (the graph's only edges), a
reused stage's task Completed in a state named Cached, a markdown artifact per stage (in stage order, its MLflow run
linked), progress lines in the logs, and at the end the run's report card (`dsv3.report`) as a Prefect artifact
and as files of the MLflow parent run. Flow runs are named `<recipe>-<variant>-<time>` and tagged dsv3, the
recipe and the variant.

The MLflow parent run is the row to compare runs by, one per variant (a rerun of an unchanged variant reopens it):
params for every value of the resolved recipe, its digest and every override; the resolved recipe as the artifact
recipe.yaml; tags for the code version (MLflow's git commit), the Prefect flow run and the run folder; each stage's
headline metrics as `<stage>/<metric>` (a failed stage's too; a skipped stage's from its manifest, with a link run
to the stage run it reused); a failure's one line as its description and tag dsv3.failure.

A stage that fails — bad input, a failed health check, a diverged loss, a full disk — ends its task in a Failed
state with one line saying why (no traceback), the stages after it do not run, and the flow returns a Failed
state carrying that line; `dsv3 run` prints it and exits non-zero. Nothing is cached or persisted by Prefect (its
results would be pickles under runs/prefect/): the manifests decide reuse, and a finished stage is skipped in
well under a second.

    dsv3 run --recipe recipes/tiny.yaml [--until tokenizer] [--set key=value ...] [--name VARIANT]
"""

import errno
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from dsv3.config import STAGE_ORDER, Recipe, flatten, load_recipe, validate_recipe
from dsv3.errors import StageFailed, classify
from dsv3.report import report_markdown, write_report
from dsv3.stages import get_stage, headline, run_stage
from dsv3.store.lock import runs_lock
from dsv3.store.manifest import read_manifest
from dsv3.store.runner import code_version
from dsv3.store.runs import recipe_digest, record_run, run_root, variant_name
from dsv3.tracking import GIT_COMMIT_TAG, PARENT_TAG, Tracker

RECIPE_ARTIFACT = "recipe.yaml"  # the resolved recipe, an artifact of the parent run
REUSED_STATE = "Cached"  # the state name (a Completed state) of a stage task that reused a finished stage

# The launch form's `until`: a choice of the stage names. A real annotation, not a string: this module keeps no
# `from __future__ import annotations`, because a served run gets the flow function pickled by value with only the
# globals its code names, and a string annotation naming `Stage` or `Literal` would leave Prefect's parameter model
# "not fully defined" (tests/test_pipeline_flow.py, tests/test_serve.py).
Stage = Literal[STAGE_ORDER]  # type: ignore[valid-type]

logging.getLogger("dsv3").setLevel(logging.INFO)  # the training's progress lines reach the flow run's logs


def run_and_publish(stage: str, recipe: Recipe, runs_dir: str, tracker: Tracker, description: str) -> dict[str, Any]:
    """Run one stage through the manifest runner (tracked by `tracker`) and publish its Prefect markdown
    artifact; returns what a stage task returns. Known failures come back as a Failed state (no traceback)."""
    workdir = run_root(runs_dir, recipe) / stage
    key = artifact_key(recipe, stage)
    try:
        outcome = run_stage(stage, recipe, runs_dir, tracker)
    except Exception as error:
        failure = classify(error, workdir)
        if failure.kind == "crash":
            raise  # a bug: Prefect shows the traceback
        create_markdown_artifact(
            key=key,
            markdown=f"# Stage `{stage}` — **failed**\n\n{failure.message}\n\nOutputs: `{tracker.relative(workdir)}`\n",
            description=description,
        )
        measured = read_manifest(workdir)  # a failed check still measured: the parent run shows it
        return Failed(
            message=failure.message,
            data={"stage": stage, "failure": asdict(failure), "metrics": measured.metrics if measured else {}},
        )
    m = outcome.manifest
    create_markdown_artifact(
        key=key,
        markdown=stage_markdown(stage, outcome.action, tracker.relative(outcome.workdir), m.metrics, tracker.run_url(m.mlflow_run_id), outcome.summary),
        description=description,
    )
    result = {
        "stage": stage,
        "action": outcome.action,
        "workdir": str(outcome.workdir),
        "metrics": m.metrics,
        "mlflow_run_id": m.mlflow_run_id,
        "parent_run_id": tracker.parent_id,
        "failed_checks": [c["name"] for c in m.failed_checks],
    }
    if outcome.action == "skipped":  # reused from the stage store: the graph and the task list say so
        return Completed(name=REUSED_STATE, message=f"reused: {stage} finished earlier with the same inputs", data=result)
    return result


def retry_crashes_only(task, task_run, state: State) -> bool:
    """Prefect retries a stage that crashed; bad input, failed checks and divergence would fail again."""
    return not isinstance(state.result(raise_on_failure=False), dict)


@task(persist_result=False, cache_policy=NO_CACHE, retry_condition_fn=retry_crashes_only)
def stage_task(stage: str, recipe: dict[str, Any], runs_dir: str, parent_run_id: str | None) -> dict[str, Any]:
    """Run one stage through the manifest runner, inside the pipeline's MLflow parent run."""
    parsed = validate_recipe(recipe)
    tracker = Tracker(runs_dir, experiment=f"dsv3-{parsed.name}")
    tracker.parent_id = parent_run_id
    return run_and_publish(stage, parsed, runs_dir, tracker, f"{stage} stage of {parsed.name}/{variant_name(parsed)}")


def flow_run_name(kind: str = "") -> str:
    """`<recipe>-<variant>[-<kind>]-<time>`, from the flow run's parameters."""
    params = flow_run.parameters
    recipe = load_recipe(params["recipe_path"], params.get("overrides") or [], params.get("name"))
    return "-".join(filter(None, (recipe.name, variant_name(recipe), kind, time.strftime("%Y%m%d-%H%M%S"))))


@flow(name="dsv3-pipeline", flow_run_name=flow_run_name, log_prints=False, persist_result=False)
def pipeline(
    recipe_path: str = "recipes/tiny.yaml",
    overrides: list[str] | None = None,
    until: Stage | None = None,
    runs_dir: str = "runs",
    name: str | None = None,
    mlflow_parent_run: str | None = None,
) -> list[dict[str, Any]]:
    """tokenizer → pretrain → extend → sft → reward → rl, as far as the recipe (or `until`) says, in the folder
    runs/<recipe>/<variant>; stops at the first stage that fails and returns a Failed state naming it. Takes the runs
    folder's lock (already held when `dsv3 run` started it). The Prefect UI's launch form shows the Args below.

    Args:
        recipe_path: a recipe YAML, relative to the repository (recipes/tiny.yaml, recipes/smoke.yaml, ...)
        overrides: recipe values to change, each `section.key=value` (e.g. pretrain.lr_peak=1e-3)
        until: the last stage to run (empty: every stage of the recipe)
        runs_dir: the runs folder the stages, MLflow and Prefect write to
        name: the variant's folder name, runs/<recipe>/<name> (empty: from the overrides and a digest)
        mlflow_parent_run: nest this run's MLflow parent run under that run (the seeds flow's)
    """
    recipe = load_recipe(recipe_path, overrides or [], name)
    stages = stages_to_run(recipe, until)
    with runs_lock(Path(runs_dir), f"Prefect flow run {flow_run.name} ({recipe_path})"):
        return run_pipeline(recipe, recipe_path, stages, runs_dir, mlflow_parent_run)


def run_pipeline(
    recipe: Recipe, recipe_path: str, stages: list[str], runs_dir: str, mlflow_parent_run: str | None = None
) -> list[dict[str, Any]] | State:
    logger = get_run_logger()
    root = record_run(runs_dir, recipe, recipe_path)
    tag_flow_run(["dsv3", recipe.name, root.name])
    tracker = Tracker(runs_dir, experiment=f"dsv3-{recipe.name}")
    tracker.close_stale_runs()
    results, failed = [], None
    tags = {
        "dsv3.recipe": recipe.name,
        "dsv3.variant": root.name,
        "dsv3.recipe_path": str(recipe_path),
        "dsv3.run_folder": tracker.relative(root),
        "dsv3.code_version": code_version(),
        GIT_COMMIT_TAG: code_version(),
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
    } | ({PARENT_TAG: mlflow_parent_run} if mlflow_parent_run else {})
    try:
        with tracker.pipeline_run(
            f"{recipe.name}/{root.name}", tags, run_params(recipe, recipe_path), reopen=True
        ) as parent_id:
            tracker.log_text(parent_id, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), RECIPE_ARTIFACT)
            failed = run_stages(recipe, stages, runs_dir, tracker, results)
            if failed and failed["failure"]["kind"] == "disk":  # nothing more can be written: no report, no tags
                raise OSError(errno.ENOSPC, failed["failure"]["message"])  # the next run closes the parent run
            if stages:
                logger.info("report:  %s", publish_report(root, recipe, tracker, parent_id))
            if failed:
                tracker.set_tags(parent_id, {"dsv3.failed_stage": failed["stage"]})
                raise StageFailed(failure_line(failed))  # the parent run ends FAILED, this line its reason
    except (StageFailed, OSError):
        if not failed:
            raise
    logger.info("outputs: %s", root)
    logger.info("MLflow:  %s (parent run %s); `make ui` to browse", tracker.run_url(tracker.parent_id), tracker.parent_id)
    if failed:
        return Failed(message=failed["failure"]["message"], data=failed | {"results": results})
    return results


def run_params(recipe: Recipe, recipe_path: str) -> dict[str, Any]:
    """The parent run's params: every value of the resolved recipe (`section.key`), what was run and the overrides
    (`set.<key>` each, all in `overrides`), so that MLflow's compare view lines any two runs up on true values."""
    resolved = {k: v for k, v in flatten(recipe).items() if k not in ("name", "variant", "overrides")}
    return {
        "recipe": recipe.name,
        "recipe_path": str(recipe_path),
        "variant": variant_name(recipe),
        "recipe_digest": recipe_digest(recipe),
        "overrides": " ".join(recipe.overrides) or "(none)",
    } | {f"set.{item.partition('=')[0]}": item.partition("=")[2] for item in recipe.overrides} | resolved


def failure_line(failed: dict) -> str:
    """`failed` (a stage's failure) as one line that names the stage."""
    stage, message = failed["stage"], failed["failure"]["message"]
    return message if message.startswith(f"stage {stage} ") else f"stage {stage}: {message}"


def run_stages(recipe: Recipe, stages: list[str], runs_dir: str, tracker: Tracker, results: list) -> dict | None:
    """Each stage as a Prefect task, in order, appending their results and logging their headline metrics to the
    parent run, until one fails; returns that failure ({"stage", "failure": {"kind", "message"}}) or None."""
    logger = get_run_logger()
    states: dict[str, State] = {}
    for stage in stages:
        started = time.time()
        task_with_options = stage_task.with_options(
            name=f"stage-{stage}", retries=recipe.pipeline.retries, retry_delay_seconds=recipe.pipeline.retry_delay_s
        )
        # The graph's edges are the stages' inputs (wait_for); the arguments are quoted, because Prefect otherwise
        # draws an edge from any earlier task whose result holds the same object (the parent run id every stage
        # returns, or a recycled id())
        upstream = [states[name] for name in get_stage(stage).upstream(recipe) if name in states]
        arguments = (stage, recipe.model_dump(mode="json"), str(runs_dir), tracker.parent_id)
        state = task_with_options(*map(quote, arguments), wait_for=upstream, return_state=True)
        states[stage] = state
        result = state.result(raise_on_failure=False)
        if state.is_failed():
            failed = result if isinstance(result, dict) else {"stage": stage, "failure": asdict(classify(result))}
            tracker.log_metrics(tracker.parent_id, parent_metrics(stage, failed.get("metrics", {})))
            logger.error("%-10s failed: %s", stage, failed["failure"]["message"])
            return failed
        result["seconds"] = time.time() - started
        tracker.log_metrics(tracker.parent_id, parent_metrics(stage, result["metrics"]))
        logger.info("%-10s %-8s %7.1fs  -> %s", stage, result["action"], result["seconds"], result["workdir"])
        for check in result["failed_checks"]:
            logger.warning("%-10s health check %s failed (checks.enforce is false: going on)", stage, check)
        results.append(result)
    return None


def parent_metrics(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """A stage's headline metrics as the parent run logs them: `<stage>/<metric>`."""
    return {f"{stage}/{k}": v for k, v in headline(stage, metrics).items()}


def tag_flow_run(tags: list[str]) -> None:
    """Add tags to the running flow run (so that the UI can filter runs by recipe and variant)."""
    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id).tags
        client.update_flow_run(flow_run.id, tags=sorted(set(current) | set(tags)))


def stages_to_run(recipe: Recipe, until: str | None) -> list[str]:
    stages = list(recipe.pipeline.stages)
    if until is None:
        return stages
    if until not in stages:
        raise ValueError(f"--until {until}: not a stage of recipe {recipe.name} (stages: {', '.join(stages)})")
    return stages[: stages.index(until) + 1]


def publish_report(root: Path, recipe: Recipe, tracker: Tracker, parent_run_id: str) -> Path:
    """Write the report card, show it as a Prefect markdown artifact, attach both files to the parent run."""
    md_path, html_path = write_report(root)
    create_markdown_artifact(
        key=artifact_key(recipe, "report"),
        markdown=report_markdown(root, link_plots=False),
        description=f"report card of {tracker.relative(root)}; {html_path.name} there has the plots",
    )
    for path in (md_path, html_path):
        tracker.log_artifact(parent_run_id, path)
    return html_path


def artifact_key(recipe: Recipe, what: str) -> str:
    """`<recipe>-<variant>-<n>-<stage>`: numbered in stage order (the report last), as Prefect's keys allow."""
    order = STAGE_ORDER.index(what) + 1 if what in STAGE_ORDER else len(STAGE_ORDER) + 1
    return re.sub(r"[^a-z0-9-]+", "-", f"{recipe.name}-{variant_name(recipe)}-{order}-{what}".lower()).strip("-")


def stage_markdown(stage: str, action: str, workdir: str, metrics: dict, run_url: str | None, summary: str) -> str:
    """A stage's Prefect artifact: what happened, its folder (relative to the runs folder), MLflow run, metrics."""
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items()))
    run = f"[{run_url}]({run_url})" if run_url else "—"
    return (
        f"# Stage `{stage}` — {action}\n\nOutputs: `{workdir}`  \nMLflow run: {run}\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n\n{summary}\n"
    )
