"""The ablation flow: pretraining ablations over several seeds through the pipeline's stage code, compared with the
papers.

    dsv3 ablations [--recipes recipes/ablations] [--runs-dir runs] [--seeds 3] [--only fp8,mtp]   (`make ablations`)

Every `<stem>.yaml` in the recipes folder is one arm of an ablation of dsv3.ablation_report.ABLATIONS (FP8 at hidden
512: fp8-wide / fp8-wide-tensorwise / fp8-wide-bf16; loss-free / aux-loss / no-balancing; mtp-on / mtp-off); the arms
of an ablation must differ in exactly its switch. Each arm runs with `seeds` seeds — the recipe's own seed s0, then
s0+1, ... as `--set seed=<s>` variants (runs/<recipe>/seed=<s>-<digest>/) — seed by seed, so an interrupted flow
leaves whole pairs. Each (arm, seed) runs its recipe's stages through the manifest runner inside Prefect tasks, so a
rerun reuses what finished: a stage whose key another arm or an earlier flow already finished (same recipe sections,
seed, inputs and code) is reused from the stage store (dsv3.store.runs) — mtp-on (loss-free but for the name) reuses
loss-free's pretraining, and `--seeds 5` after `--seeds 3` trains only the two new seeds.

MLflow, one experiment (`dsv3-ablations`): a run `ablations` per flow run (param seeds); under it one run per arm,
tagged ablation=<name> and arm=<stem>, with each key metric's mean and sd over the seeds; under that one run per seed
(param seed, the seed's key metrics, with the MTP acceptance rate the pretrain stage measured teacher-forced on
held-out text);
under that the stage runs. At the end the comparison —
runs/ablations/ablations.md and .html, a PNG of curves per ablation and the balancing MaxVio plot — as a Prefect
markdown artifact and as artifacts of the `ablations` run. An (arm, seed) that fails is reported and the others go
on; the flow then raises, naming it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from dsv3.ablation_report import (
    ABLATIONS,
    ARMS,
    Ablation,
    ArmRun,
    Runs,
    check_pair,
    comparison_markdown,
    plot_curves,
    plot_maxvio,
)
from dsv3.config import Recipe, flatten, load_recipe, validate_recipe
from dsv3.errors import StageFailed
from dsv3.html_page import markdown_to_html
from dsv3.stages import pretrain
from dsv3.store.manifest import read_manifest
from dsv3.store.runner import code_version
from dsv3.store.runs import record_run, run_root
from dsv3.tracking import PARENT_TAG, Tracker
from flows.pipeline import retry_crashes_only, run_and_publish

EXPERIMENT = "dsv3-ablations"
REPORT_DIR = "ablations"  # runs/ablations/: the comparison
ARM_METRICS = ("final_val_loss", "final_val_bits_per_byte", "final_val_maxvio_global", "best_val_loss", "stage_seconds")
DEFAULT_SEEDS = 3


@task(persist_result=False, cache_policy=NO_CACHE, retry_condition_fn=retry_crashes_only)
def arm_stage_task(
    stage: str, recipe: dict[str, Any], runs_dir: str, parent_run_id: str, tags: dict[str, str]
) -> dict[str, Any]:
    """Run one stage of one (arm, seed) through the manifest runner, nested in that seed's MLflow run."""
    parsed = validate_recipe(recipe)
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tracker.parent_id = parent_run_id
    result = run_and_publish(stage, parsed, runs_dir, tracker, f"{stage} stage of ablation arm {parsed.name}, seed {parsed.seed}")
    if isinstance(result, dict) and result["action"] != "skipped":
        tracker.set_tags(result["mlflow_run_id"], tags)
    return result


@flow(name="dsv3-ablations", log_prints=False)
def ablations(
    recipes_dir: str = "recipes/ablations",
    runs_dir: str = "runs",
    seeds: int = DEFAULT_SEEDS,
    only: list[str] | None = None,
) -> Path:
    """Run every arm found in `recipes_dir` with `seeds` seeds, then write and publish the comparison; returns
    ablations.md.

    only: names of the ablations to run (default all; the others show as missing)."""
    arms = load_arms(recipes_dir)
    chosen = select_ablations(only)
    logger = get_run_logger()
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    stems = [stem for ablation in chosen for stem in ablation.arms if stem in arms]
    for ablation in chosen:
        for stem in ablation.arms:
            if stem not in arms:
                logger.info("%-9s %-19s no recipe in %s: missing", ablation.name, stem, recipes_dir)
    seed_list = arm_seeds(arms, stems, seeds)
    runs: Runs = {stem: {} for stem in ARMS}
    failures: list[str] = []
    tags = {"dsv3.flow": "ablations", "dsv3.recipes": str(recipes_dir), "dsv3.code_version": code_version()}
    with tracker.pipeline_run("ablations", tags=tags) as top_id, ExitStack() as arm_runs:
        tracker.log_params(top_id, {"seeds": seeds, "ablations": ",".join(a.name for a in chosen)})
        arm_ids = {stem: arm_runs.enter_context(arm_run_context(runs_dir, ARMS[stem], stem, arms[stem], top_id)) for stem in stems}
        for index in range(seeds):  # seed-major: an interrupted flow leaves whole pairs
            for stem in stems:
                path, recipe = arms[stem]
                seeded = seed_variant(path, recipe, index)
                try:
                    run = run_seed(ARMS[stem], stem, path, seeded, runs_dir, arm_ids[stem])
                except Exception as err:  # the other (arm, seed)s go on; the flow fails at the end
                    failures.append(f"{stem} seed {seeded.seed}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                    logger.error("arm %s failed: %s", stem, failures[-1])
                    continue
                if run is not None:
                    runs[stem][seeded.seed] = run
        for stem in stems:
            log_arm_spread(tracker, arm_ids[stem], runs[stem])
        notes = [f"Arm {f} (rerun `make ablations` to resume it)." for f in failures]
        report = publish(runs, Path(runs_dir) / REPORT_DIR, tracker, top_id, notes, seed_list)
    logger.info("comparison: %s", report)
    logger.info("MLflow: %s, experiment %s; `make ui` to browse", tracker.uri, EXPERIMENT)
    if failures:
        message = f"ablation arms failed: {'; '.join(failures)}"
        return Failed(message=message, data={"failure": {"kind": "check", "message": message}})
    return report


def select_ablations(only: list[str] | None) -> list[Ablation]:
    """The ablations named in `only` (all when None), in ABLATIONS order; ValueError naming an unknown one."""
    names = [a.name for a in ABLATIONS]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: not an ablation; choose from {', '.join(names)}")
    return [a for a in ABLATIONS if only is None or a.name in only]


def arm_seeds(arms: dict[str, tuple[str, Recipe]], stems: list[str], seeds: int) -> list[int]:
    """The seeds the flow runs: s0, s0+1, ... (s0 = the arms' common seed); ValueError when the arms disagree on s0
    (their pairs would not share initialisation and data order) or seeds < 1."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: run at least one seed (3 or more to tell an effect from noise)")
    first = {arms[stem][1].seed for stem in stems}
    if len(first) > 1:
        raise ValueError(f"the arm recipes set different seeds ({sorted(first)}); give them one seed, the flow adds the others")
    base = first.pop() if first else 0
    return [base + i for i in range(seeds)]


def seed_variant(path: str, recipe: Recipe, index: int) -> Recipe:
    """The arm's recipe for its index-th seed: itself for 0, else reloaded with `--set seed=<s0 + index>` (its own
    run folder, named by the override)."""
    return recipe if index == 0 else load_recipe(path, [*recipe.overrides, f"seed={recipe.seed + index}"])


def load_arms(recipes_dir: str | Path) -> dict[str, tuple[str, Recipe]]:
    """{stem: (path, recipe)} of the recipes in the folder; each stem an arm, the arms of an ablation differing in
    its switch only (each checked against the ablation's first arm)."""
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
        first, *others = [stem for stem in ablation.arms if stem in arms] or [None]
        for stem in others:
            check_pair(ablation, flatten(arms[first][1]), flatten(arms[stem][1]), (first, stem))
    return arms


@contextmanager
def arm_run_context(runs_dir: str, ablation: Ablation, stem: str, arm: tuple[str, Recipe], top_id: str) -> Iterator[str]:
    """The arm's MLflow run under the `ablations` run, its switch (and companions) as params; its seeds' runs nest
    under it."""
    path, recipe = arm
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tags = {"ablation": ablation.name, "arm": stem, PARENT_TAG: top_id, "dsv3.recipe": recipe.name, "dsv3.recipe_path": path}
    with tracker.pipeline_run(recipe.name, tags=tags) as run_id:
        flat = flatten(recipe)
        tracker.log_params(run_id, {k: flat[k] for k in (ablation.switch, *ablation.also)})
        yield run_id


def run_seed(
    ablation: Ablation,
    stem: str,
    path: str,
    recipe: Recipe,
    runs_dir: str,
    arm_run_id: str,
) -> ArmRun | None:
    """One seed of one arm: its stages in order (a stage another arm or an earlier flow finished with the same key is
    reused from the stage store) in a seed run nested in the arm's MLflow run; the finished pretraining, or None when
    the recipe has no pretrain stage."""
    logger = get_run_logger()
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tags = {"ablation": ablation.name, "arm": stem, "seed": str(recipe.seed)}
    run_tags = tags | {PARENT_TAG: arm_run_id, "dsv3.recipe": recipe.name, "dsv3.recipe_path": path}
    with tracker.pipeline_run(f"{stem} seed {recipe.seed}", tags=run_tags) as seed_run_id:
        tracker.log_params(seed_run_id, {ablation.switch: flatten(recipe)[ablation.switch], "seed": recipe.seed})
        record_run(runs_dir, recipe, path)
        for stage in recipe.pipeline.stages:
            state = arm_stage_task.with_options(name=f"{stem}-seed{recipe.seed}-{stage}")(
                stage, recipe.model_dump(mode="json"), str(runs_dir), seed_run_id, tags, return_state=True
            )
            result = state.result(raise_on_failure=False)
            if isinstance(result, BaseException):
                raise result
            if state.is_failed():
                raise StageFailed(result["failure"]["message"])
            logger.info("%-19s seed %-5d %-10s %s", stem, recipe.seed, stage, result["action"])
        run = arm_run(recipe, runs_dir, ablation)
        if run is None:
            return None
        tracker.log_metrics(seed_run_id, arm_metrics(run))
    return run


def arm_metrics(run: ArmRun) -> dict[str, float]:
    """One seed's key metrics: ARM_METRICS from the pretrain stage, the claims' second-half means and, with an MTP
    module, the acceptance rate."""
    metrics = {k: run.metrics[k] for k in ARM_METRICS}
    metrics |= {"val_loss_second_half": run.val_loss, "val_maxvio_global_second_half": run.maxvio}
    return metrics | ({"mtp_acceptance_rate": run.acceptance} if run.acceptance is not None else {})


def log_arm_spread(tracker: Tracker, arm_run_id: str, seeds: dict[int, ArmRun]) -> None:
    """The arm's run: <metric>_mean and <metric>_sd over its seeds (sd only with two or more), and the seed count."""
    if not seeds:
        return
    per_seed = [arm_metrics(r) for r in seeds.values()]
    values = {k: [m[k] for m in per_seed] for k in per_seed[0] if all(k in m for m in per_seed)}
    metrics = {"seeds": float(len(per_seed))} | {f"{k}_mean": statistics.fmean(v) for k, v in values.items()}
    if len(per_seed) > 1:
        metrics |= {f"{k}_sd": statistics.stdev(v) for k, v in values.items()}
    tracker.log_metrics(arm_run_id, metrics)


def arm_run(recipe: Recipe, runs_dir: str, ablation: Ablation) -> ArmRun | None:
    """The (arm, seed)'s finished pretraining as an ArmRun, or None when its pretrain stage has not completed."""
    workdir = run_root(runs_dir, recipe) / "pretrain"
    manifest = read_manifest(workdir)
    if manifest is None or manifest.status != "completed":
        return None
    history = json.loads((workdir / pretrain.RESULT).read_text())["history"]
    flat = flatten(recipe)
    return ArmRun(
        recipe.name, {k: flat[k] for k in (ablation.switch, *ablation.also)}, manifest.metrics, history,
        acceptance=manifest.metrics.get("mtp_acceptance_teacher_forced"), mlflow_run_id=manifest.mlflow_run_id, seed=recipe.seed,
    )


def publish(
    runs: Runs, out_dir: Path, tracker: Tracker, top_id: str, notes: list[str], seeds: list[int]
) -> Path:
    """ablations.md / .html and the plots in out_dir; a Prefect artifact; artifacts of the top run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, list[str]] = {}
    for ablation in ABLATIONS:
        wanted = {f"{ablation.name}_curves.png": plot_curves} | (
            {f"{ablation.name}_maxvio.png": plot_maxvio} if ablation.name == "balancing" else {}
        )
        ran = [stem for stem in ablation.arms if runs.get(stem)]
        for name, plot in wanted.items():
            png = out_dir / name
            if len(ran) >= 2:
                plots.setdefault(ablation.name, []).append(plot(ablation, runs, png).name)
            else:
                png.unlink(missing_ok=True)  # a stale plot of an earlier run would contradict "missing"
    text = comparison_markdown(runs, plots, notes, seeds=seeds)
    md_path, html_path = out_dir / "ablations.md", out_dir / "ablations.html"
    md_path.write_text(text, encoding="utf-8")
    html_path.write_text(markdown_to_html(text, out_dir, "dsv3 ablations"), encoding="utf-8")
    create_markdown_artifact(
        key="dsv3-ablations",
        markdown=comparison_markdown(
            runs, {n: [str(out_dir / p) for p in ps] for n, ps in plots.items()}, notes, link_plots=False, seeds=seeds
        ),
        description=f"ablation comparison; {html_path} has the plots",
    )
    for path in (md_path, html_path, *(out_dir / p for ps in plots.values() for p in ps)):
        tracker.log_artifact(top_id, path)
    return md_path
