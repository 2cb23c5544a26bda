"""The ablation flow: paired pretraining runs through the pipeline's stage code, compared with the papers.

    python -m flows.ablations [--recipes recipes/ablations] [--runs-dir runs]        (what `make ablations` runs)

Every `<stem>.yaml` in the recipes folder is one arm of an ablation of dsv3.eval.ablations.ABLATIONS (fp8 / bf16,
loss-free / aux-loss, mtp-on / mtp-off); the two arms of a pair must differ in exactly the ablation's switch. Each
arm runs its recipe's stages through the manifest runner inside Prefect tasks with the pipeline's manifest-keyed
cache, so a rerun reuses finished runs. Before a stage runs, a finished stage of an earlier arm with the same key
(same recipe sections, inputs and code) is copied into the arm's folder, where the runner trusts and skips it: the
six arms train one tokenizer, and mtp-on (loss-free but for the name) reuses loss-free's pretraining.

MLflow, one experiment (`dsv3-ablations`): a run `ablations` per flow run; under it one run per arm, tagged
ablation=<fp8|balancing|mtp> and arm=<stem>, holding the arm's key metrics; under that the stage runs. At the end,
the MTP acceptance rate of every arm that has an MTP module (greedy speculative decoding on validation prompts),
then the comparison — runs/ablations/ablations.md and .html and one PNG of paired curves per ablation — as a
Prefect markdown artifact and as artifacts of the `ablations` run. An arm that fails is reported and the others
go on; the flow then raises, naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# Before Prefect reads its settings (as flows/pipeline.py).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402

import dsv3.eval.ablations as ablation_eval  # noqa: E402
from dsv3.config import Recipe, RecipeError, flatten, load_recipe  # noqa: E402
from dsv3.eval.ablations import (  # noqa: E402
    ABLATIONS,
    ARMS,
    Ablation,
    ArmRun,
    acceptance_prompts,
    check_pair,
    comparison_markdown,
    mtp_acceptance,
    plot_pair,
)
from dsv3.infer import speculative  # noqa: E402
from dsv3.infer.generate import load_checkpoint  # noqa: E402
from dsv3.report import markdown_to_html  # noqa: E402
from dsv3.stages import pretrain  # noqa: E402
from dsv3.stages.corpus import recipe_corpus  # noqa: E402
from dsv3.stages.manifest import is_trusted, read_manifest  # noqa: E402
from dsv3.stages.runner import StageInputError, code_version, run_root, stage_key  # noqa: E402
from dsv3.tracking import PARENT_TAG, Tracker  # noqa: E402
from flows.pipeline import manifest_cache_key, run_and_publish  # noqa: E402

EXPERIMENT = "dsv3-ablations"
REPORT_DIR = "ablations"  # runs/ablations/: the comparison
ARM_METRICS = ("final_val_loss", "final_val_bits_per_byte", "final_val_maxvio_global", "best_val_loss")


@task(cache_key_fn=manifest_cache_key, persist_result=True)
def arm_stage_task(
    stage: str, recipe: dict[str, Any], runs_dir: str, parent_run_id: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Run one stage of one arm through the manifest runner, nested in the arm's MLflow run."""
    parsed = Recipe.model_validate(recipe)
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tracker.parent_id = parent_run_id
    result = run_and_publish(stage, parsed, runs_dir, tracker, f"{stage} stage of ablation arm {parsed.name}")
    if result["action"] != "skipped":
        tracker.set_tags(result["mlflow_run_id"], tags)
    return result


def acceptance_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The pretrained model's output hash, the data section, the measurement's settings and its code: an arm
    whose model equals another's (mtp-on and loss-free) or a rerun reuses the rate; None while no model is there."""
    recipe = Recipe.model_validate(parameters["recipe"])
    workdir = run_root(parameters["runs_dir"], recipe) / "pretrain"
    manifest = read_manifest(workdir)
    if manifest is None or manifest.status != "completed":
        return None
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (ablation_eval, speculative)))
    settings = f"{parameters['prompts']}-{parameters['prompt_tokens']}-{parameters['new_tokens']}"
    return (
        f"dsv3-acceptance-{manifest.output_hash[:24]}-{recipe.section_hash('data')[:16]}-{settings}-"
        f"{code.hexdigest()[:16]}"
    )


@task(cache_key_fn=acceptance_cache_key, persist_result=True)
def acceptance_task(
    recipe: dict[str, Any], runs_dir: str, prompts: int, prompt_tokens: int, new_tokens: int
) -> float:
    """MTP acceptance rate of the arm's pretrained model on `prompts` windows of its validation text."""
    parsed = Recipe.model_validate(recipe)
    model, tokenizer = load_checkpoint(run_root(runs_dir, parsed) / "pretrain" / pretrain.OUTPUT)
    texts = recipe_corpus(parsed.data)["validation"]["text"]
    return mtp_acceptance(model, acceptance_prompts(tokenizer, texts, prompts, prompt_tokens), new_tokens)


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
    finished: list[Recipe] = []
    tags = {"dsv3.flow": "ablations", "dsv3.recipes": str(recipes_dir), "dsv3.code_version": code_version()}
    with tracker.pipeline_run("ablations", tags=tags) as top_id:
        for ablation in ABLATIONS:
            for stem in (ablation.arm, ablation.baseline):
                if stem not in arms:
                    logger.info("%-9s %-9s no recipe in %s: missing", ablation.name, stem, recipes_dir)
                    continue
                path, recipe = arms[stem]
                try:
                    runs[stem] = run_arm(ablation, stem, path, recipe, runs_dir, top_id, finished, acceptance)
                except Exception as err:  # the other arms go on; the flow fails at the end
                    failures.append(f"{stem}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                    logger.error("arm %s failed: %s", stem, failures[-1])
                    continue
                finished.append(recipe)
        notes = [f"Arm {f} (rerun `make ablations` to resume it)." for f in failures]
        report = publish(runs, Path(runs_dir) / REPORT_DIR, tracker, top_id, notes)
    logger.info("comparison: %s", report)
    logger.info("MLflow: %s, experiment %s; `make ui` to browse", tracker.uri, EXPERIMENT)
    if failures:
        raise RuntimeError(f"ablation arms failed: {'; '.join(failures)}")
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
    donors: list[Recipe],
    acceptance: tuple[int, int, int],
) -> ArmRun | None:
    """The arm's stages in order (adopting those a donor arm finished with the same key), then its MTP acceptance
    rate, in the arm's MLflow run; the arm's finished pretraining, or None when the recipe has no pretrain stage."""
    logger = get_run_logger()
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tags = {"ablation": ablation.name, "arm": stem}
    run_tags = tags | {PARENT_TAG: top_id, "dsv3.recipe": recipe.name, "dsv3.recipe_path": path}
    with tracker.pipeline_run(recipe.name, tags=run_tags) as arm_run_id:
        tracker.log_params(
            arm_run_id, {ablation.switch: flatten(recipe)[ablation.switch], "seed": recipe.seed}
        )
        for stage in recipe.pipeline.stages:
            donor = adopt_finished_stage(stage, recipe, runs_dir, donors)
            if donor:
                logger.info("%-9s %-10s reuses the finished stage of %s", stem, stage, donor)
            result = arm_stage_task.with_options(name=f"{stem}-{stage}")(
                stage, recipe.model_dump(mode="json"), str(runs_dir), arm_run_id, tags
            )
            if result["parent_run_id"] != arm_run_id:  # a Prefect cache hit: the body did not run
                result = result | {"action": "skipped"}
                tracker.mark_reused(stage, result["mlflow_run_id"])
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


def adopt_finished_stage(stage: str, recipe: Recipe, runs_dir: str, donors: list[Recipe]) -> str | None:
    """Copy a donor arm's finished `stage` into this arm's folder when the runner would trust it under this arm's
    key (equal recipe sections, inputs and code); returns the donor's name, or None when nothing was copied."""
    root = run_root(runs_dir, recipe)
    try:
        key = stage_key(stage, recipe, root)
    except StageInputError:
        return None  # the runner reports the missing input
    if is_trusted(read_manifest(root / stage), key, root / stage):
        return None
    for donor in donors:
        source = run_root(runs_dir, donor) / stage
        if donor.name != recipe.name and is_trusted(read_manifest(source), key, source):
            partial = root / f".{stage}.adopting"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial)
            shutil.rmtree(root / stage, ignore_errors=True)
            os.replace(partial, root / stage)
            return donor.name
    return None


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.ablations",
        description="Run the paired ablation pretrainings (one recipe per arm) and write runs/ablations/ablations.md.",
    )
    parser.add_argument(
        "--recipes", default="recipes/ablations", help="folder of arm recipes (recipes/ablations)"
    )
    parser.add_argument(
        "--runs-dir", default=os.environ.get("DSV3_RUNS_DIR", "runs"), help="where runs go (runs/)"
    )
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir).resolve()
    os.environ.setdefault("PREFECT_HOME", str(runs_dir / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    try:
        load_arms(args.recipes)  # fail fast, before Prefect starts
    except (RecipeError, ValueError) as err:
        print(f"ablations: error: {err}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    ablations(recipes_dir=args.recipes, runs_dir=str(runs_dir))


if __name__ == "__main__":
    main()
