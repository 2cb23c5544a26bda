"""The ablation flow: paired pretraining runs through the pipeline's stage code, compared with the papers.

    dsv3 ablations [--recipes recipes/ablations] [--runs-dir runs]        (what `make ablations` runs)

Every `<stem>.yaml` in the recipes folder is one arm of an ablation of dsv3.ablation_report.ABLATIONS (fp8 / bf16,
loss-free / aux-loss, mtp-on / mtp-off); the two arms of a pair must differ in exactly the ablation's switch. Each
arm runs its recipe's stages through the manifest runner inside Prefect tasks, so a rerun reuses finished runs; a
stage whose key another arm already finished (same recipe sections, inputs and code) is reused from the stage
store (dsv3.stages.runs): the six arms train one tokenizer, and mtp-on (loss-free but for the name) reuses
loss-free's pretraining.

MLflow, one experiment (`dsv3-ablations`): a run `ablations` per flow run; under it one run per arm, tagged
ablation=<fp8|balancing|mtp> and arm=<stem>, holding the arm's key metrics; under that the stage runs. At the end,
the MTP acceptance rate of every arm that has an MTP module (greedy speculative decoding on validation prompts),
then the comparison — runs/ablations/ablations.md and .html and one PNG of paired curves per ablation — as a
Prefect markdown artifact and as artifacts of the `ablations` run. An arm that fails is reported and the others
go on; the flow then raises, naming it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

import dsv3.eval.acceptance as acceptance
from dsv3.ablation_report import (
    ABLATIONS,
    ARMS,
    Ablation,
    ArmRun,
    check_pair,
    comparison_markdown,
    plot_pair,
)
from dsv3.config import Recipe, flatten, load_recipe
from dsv3.data.corpus import recipe_corpus
from dsv3.errors import StageFailed
from dsv3.infer.generate import load_checkpoint
from dsv3.io import write_json_atomic
from dsv3.report import markdown_to_html
from dsv3.stages import pretrain
from dsv3.stages.manifest import read_manifest
from dsv3.stages.runner import code_version, stage_code_hash
from dsv3.stages.runs import record_run, run_root
from dsv3.tracking import PARENT_TAG, Tracker
from flows.pipeline import retry_crashes_only, run_and_publish

EXPERIMENT = "dsv3-ablations"
REPORT_DIR = "ablations"  # runs/ablations/: the comparison
ARM_METRICS = ("final_val_loss", "final_val_bits_per_byte", "final_val_maxvio_global", "best_val_loss")


@task(persist_result=False, cache_policy=NO_CACHE, retry_condition_fn=retry_crashes_only)
def arm_stage_task(
    stage: str, recipe: dict[str, Any], runs_dir: str, parent_run_id: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Run one stage of one arm through the manifest runner, nested in the arm's MLflow run."""
    parsed = Recipe.model_validate(recipe)
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tracker.parent_id = parent_run_id
    result = run_and_publish(stage, parsed, runs_dir, tracker, f"{stage} stage of ablation arm {parsed.name}")
    if isinstance(result, dict) and result["action"] != "skipped":
        tracker.set_tags(result["mlflow_run_id"], tags)
    return result


def acceptance_key(recipe: Recipe, runs_dir: str, settings: tuple[int, int, int]) -> str | None:
    """The pretrained model's output hash, the data section, the measurement's settings and its code: an arm
    whose model equals another's (mtp-on and loss-free) or a rerun reuses the rate; None while no model is there."""
    manifest = read_manifest(run_root(runs_dir, recipe) / "pretrain")
    if manifest is None or manifest.status != "completed":
        return None
    code = stage_code_hash(acceptance)
    return hashlib.sha256(f"{manifest.output_hash}-{recipe.section_hash('data')}-{settings}-{code}".encode()).hexdigest()


@task(persist_result=False, cache_policy=NO_CACHE)
def acceptance_task(
    recipe: dict[str, Any], runs_dir: str, prompts: int, prompt_tokens: int, new_tokens: int
) -> float:
    """MTP acceptance rate of the arm's pretrained model on `prompts` windows of its validation text, kept in
    runs/ablations/acceptance/<key>.json (JSON, read back only when its key matches)."""
    parsed = Recipe.model_validate(recipe)
    key = acceptance_key(parsed, runs_dir, (prompts, prompt_tokens, new_tokens))
    cached = Path(runs_dir) / REPORT_DIR / "acceptance" / f"{key}.json"
    if key and cached.is_file():
        return float(json.loads(cached.read_text())["acceptance_rate"])
    model, tokenizer = load_checkpoint(run_root(runs_dir, parsed) / "pretrain" / pretrain.OUTPUT)
    texts = recipe_corpus(parsed.data)["validation"]["text"]
    rate = acceptance.mtp_acceptance(model, acceptance.acceptance_prompts(tokenizer, texts, prompts, prompt_tokens), new_tokens)
    if key:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cached, {"acceptance_rate": rate, "arm": parsed.name})
    return rate


@flow(name="dsv3-ablations", log_prints=False)
def ablations(
    recipes_dir: str = "recipes/ablations",
    runs_dir: str = "runs",
    acceptance: tuple[int, int, int] = (8, 32, 32),
) -> Path:
    """Run every arm found in `recipes_dir`, then write and publish the comparison; returns ablations.md.

    acceptance: (prompts, prompt tokens, new tokens) of the MTP acceptance measurement."""
    arms = load_arms(recipes_dir)
    logger = get_run_logger()
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    runs: dict[str, ArmRun | None] = {stem: None for stem in ARMS}
    failures: list[str] = []
    tags = {"dsv3.flow": "ablations", "dsv3.recipes": str(recipes_dir), "dsv3.code_version": code_version()}
    with tracker.pipeline_run("ablations", tags=tags) as top_id:
        for ablation in ABLATIONS:
            for stem in (ablation.arm, ablation.baseline):
                if stem not in arms:
                    logger.info("%-9s %-9s no recipe in %s: missing", ablation.name, stem, recipes_dir)
                    continue
                path, recipe = arms[stem]
                try:
                    runs[stem] = run_arm(ablation, stem, path, recipe, runs_dir, top_id, acceptance)
                except Exception as err:  # the other arms go on; the flow fails at the end
                    failures.append(f"{stem}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                    logger.error("arm %s failed: %s", stem, failures[-1])
                    continue
        notes = [f"Arm {f} (rerun `make ablations` to resume it)." for f in failures]
        report = publish(runs, Path(runs_dir) / REPORT_DIR, tracker, top_id, notes)
    logger.info("comparison: %s", report)
    logger.info("MLflow: %s, experiment %s; `make ui` to browse", tracker.uri, EXPERIMENT)
    if failures:
        message = f"ablation arms failed: {'; '.join(failures)}"
        return Failed(message=message, data={"failure": {"kind": "check", "message": message}})
    return report


def load_arms(recipes_dir: str | Path) -> dict[str, tuple[str, Recipe]]:
    """{stem: (path, recipe)} of the recipes in the folder; each stem an arm, each pair differing in its switch."""
    paths = sorted(Path(recipes_dir).glob("*.yaml"))
    if not paths:
        raise ValueError(f"{recipes_dir}: no recipes (*.yaml); pass the folder of the ablation recipes")
    arms = {}
    for path in paths:
        if path.stem not in ARMS:
            raise ValueError(
                f"{path}: not an arm of any ablation; name the file one of {', '.join(ARMS)}.yaml"
            )
        arms[path.stem] = (str(path), load_recipe(path))
    for ablation in ABLATIONS:
        if ablation.arm in arms and ablation.baseline in arms:
            check_pair(ablation, flatten(arms[ablation.arm][1]), flatten(arms[ablation.baseline][1]))
    return arms


def run_arm(
    ablation: Ablation,
    stem: str,
    path: str,
    recipe: Recipe,
    runs_dir: str,
    top_id: str,
    acceptance: tuple[int, int, int],
) -> ArmRun | None:
    """The arm's stages in order (a stage another arm finished with the same key is reused from the stage store),
    then its MTP acceptance rate, in the arm's MLflow run; the arm's finished pretraining, or None when the recipe
    has no pretrain stage."""
    logger = get_run_logger()
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tags = {"ablation": ablation.name, "arm": stem}
    run_tags = tags | {PARENT_TAG: top_id, "dsv3.recipe": recipe.name, "dsv3.recipe_path": path}
    with tracker.pipeline_run(recipe.name, tags=run_tags) as arm_run_id:
        tracker.log_params(
            arm_run_id, {ablation.switch: flatten(recipe)[ablation.switch], "seed": recipe.seed}
        )
        record_run(runs_dir, recipe, path)
        for stage in recipe.pipeline.stages:
            state = arm_stage_task.with_options(name=f"{stem}-{stage}")(
                stage, recipe.model_dump(mode="json"), str(runs_dir), arm_run_id, tags, return_state=True
            )
            result = state.result(raise_on_failure=False)
            if isinstance(result, BaseException):
                raise result
            if state.is_failed():
                raise StageFailed(result["failure"]["message"])
            logger.info("%-9s %-10s %s", stem, stage, result["action"])
        run = arm_run(recipe, runs_dir, ablation.switch)
        if run is None:
            return None
        metrics = {k: run.metrics[k] for k in ARM_METRICS}
        if recipe.model.num_nextn_predict_layers > 0:
            run.acceptance = acceptance_task.with_options(name=f"{stem}-mtp-acceptance")(
                recipe.model_dump(mode="json"), str(runs_dir), *acceptance
            )
            metrics["mtp_acceptance_rate"] = run.acceptance
        tracker.log_metrics(arm_run_id, metrics)
    return run


def arm_run(recipe: Recipe, runs_dir: str, switch: str) -> ArmRun | None:
    """The arm's finished pretraining as an ArmRun, or None when its pretrain stage has not completed."""
    workdir = run_root(runs_dir, recipe) / "pretrain"
    manifest = read_manifest(workdir)
    if manifest is None or manifest.status != "completed":
        return None
    history = json.loads((workdir / pretrain.RESULT).read_text())["history"]
    return ArmRun(
        recipe.name, flatten(recipe)[switch], manifest.metrics, history, mlflow_run_id=manifest.mlflow_run_id
    )


def publish(
    runs: dict[str, ArmRun | None], out_dir: Path, tracker: Tracker, top_id: str, notes: list[str]
) -> Path:
    """ablations.md / .html and the paired-curve PNGs in out_dir; a Prefect artifact; artifacts of the top run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    for ablation in ABLATIONS:
        arm, baseline = runs[ablation.arm], runs[ablation.baseline]
        png = out_dir / f"{ablation.name}_curves.png"
        if arm is not None and baseline is not None:
            plots[ablation.name] = plot_pair(ablation, arm, baseline, png).name
        else:
            png.unlink(missing_ok=True)  # a stale plot of an earlier run would contradict "missing"
    text = comparison_markdown(runs, plots, notes)
    md_path, html_path = out_dir / "ablations.md", out_dir / "ablations.html"
    md_path.write_text(text, encoding="utf-8")
    html_path.write_text(markdown_to_html(text, out_dir, "dsv3 ablations"), encoding="utf-8")
    create_markdown_artifact(
        key="dsv3-ablations",
        markdown=comparison_markdown(
            runs, {n: str(out_dir / p) for n, p in plots.items()}, notes, link_plots=False
        ),
        description=f"ablation comparison; {html_path} has the plots",
    )
    for path in (md_path, html_path, *(out_dir / p for p in plots.values())):
        tracker.log_artifact(top_id, path)
    return md_path
