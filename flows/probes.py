"""The probes flow: what the tiny pipeline cannot show at its scale, each effect isolated where a CPU can show it.

    dsv3 probes [--recipes recipes/probes] [--runs-dir runs] [--only copy,grpo] [--seeds 1]   (what `make probes` runs)

- copy.yaml: the copy/retrieval probe (dsv3.probes.copy) in one Prefect task, its training curves in an MLflow run
  `copy` of the experiment `dsv3-probes`; its result lies in runs/probes/copy/ with its key, so a rerun reads it back.
- grpo.yaml: a pipeline recipe (tokenizer → pretrain → sft → reward → rl) run by the pipeline flow as a subflow, once
  per seed (s0, s0+1, ... as `seed=` variants); finished stages are reused as by `dsv3 run`. Its table
  (dsv3.probes.grpo) is read from the rl stages' manifests and MLflow runs.

At the end runs/probes/probes.md and .html (with the plots) say up front what the tiny pipeline cannot show and why,
then give each probe's tables; a Prefect markdown artifact and artifacts of an MLflow run `probes`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from dsv3.config import flatten, load_recipe
from dsv3.html_page import markdown_to_html
from dsv3.probes import copy as copy_probe
from dsv3.probes import grpo as grpo_probe
from dsv3.store.runner import code_version
from dsv3.tracking import PARENT_TAG, Tracker
from flows.pipeline import pipeline

EXPERIMENT = "dsv3-probes"
REPORT_DIR = "probes"  # runs/probes/
PROBES = ("copy", "grpo")
PREFACE = """# Probes: each effect where a CPU can show it

**What the tiny pipeline cannot show, and why.** The tiny recipe trains ~4·10^5 tokens (98 steps of 16 × 256) in a few
minutes on 2 CPU cores. In-context copying — the induction heads that passkey retrieval and copying numbers from a
prompt rest on — emerges only after on the order of 10^7 tokens at such batch and context sizes (Olsson et al. 2022,
"In-context learning and induction heads"; Aoyama et al. 2025 put the emergence point at ~10^5.7·√(batch·context)
tokens, ≈ 2.6·10^7 for 16 × 256), so the tiny pipeline's passkey accuracy stays at 0% and its SFT model answers 1–6% of
held-out arithmetic, which leaves GRPO nothing to sharpen. These are limits of scale, not failures of the stages. The
probes below isolate each effect on data and a model where 2 CPU cores can show it."""


@task(persist_result=False, cache_policy=NO_CACHE)
def copy_task(recipe_path: str, runs_dir: str, top_id: str) -> dict:
    """The copy/retrieval probe in runs/probes/copy/, training curves in its MLflow run (nested in `probes`)."""
    from lightning.pytorch.loggers import MLFlowLogger

    recipe = copy_probe.load_copy_recipe(recipe_path)
    logger = get_run_logger()
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    tags = {PARENT_TAG: top_id, "dsv3.probe": "copy", "dsv3.recipe_path": recipe_path}
    with tracker.pipeline_run("copy", tags=tags) as run_id:
        tracker.log_params(run_id, flatten(recipe))
        workdir = Path(runs_dir) / REPORT_DIR / "copy"
        result = copy_probe.run(
            recipe, workdir, lambda: MLFlowLogger(tracking_uri=tracker.uri, run_id=run_id), log=logger.info
        )
        last = result["training"][-1]
        metrics = {"induction_gain": last["induction_gain"], "retrieval_accuracy": last["retrieval_accuracy"],
                   "probe_seconds": result["seconds"]}  # fmt: skip
        for name, lengths in result["variants"].items():
            slug = name.replace(" ", "_").replace(",", "")
            for length, m in lengths.items():
                metrics |= {f"{slug}/L{length}/induction_gain": m["induction_gain"],
                            f"{slug}/L{length}/retrieval_accuracy": m["retrieval_accuracy"]}  # fmt: skip
        tracker.log_metrics(run_id, metrics)
        for name in (copy_probe.REPORT, copy_probe.PLOT):
            tracker.log_artifact(run_id, workdir / name)
    return result


@flow(name="dsv3-probes", log_prints=False)
def probes(recipes_dir: str = "recipes/probes", runs_dir: str = "runs", only: list[str] | None = None, seeds: int = 1) -> Path:
    """Run the probes found in `recipes_dir` (copy.yaml, grpo.yaml; `only` a subset), GRPO with `seeds` seeds, then
    write and publish runs/probes/probes.md; returns its path."""
    found = probe_recipes(recipes_dir, only)
    logger = get_run_logger()
    tracker = Tracker(runs_dir, experiment=EXPERIMENT)
    out = Path(runs_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    sections, failures = {}, []
    with tracker.pipeline_run("probes", tags={"dsv3.flow": "probes", "dsv3.code_version": code_version()}) as top_id:
        tracker.log_params(top_id, {"probes": ",".join(found), "seeds": seeds})
        if "copy" in found:
            state = copy_task(found["copy"], str(runs_dir), top_id, return_state=True)
            if state.is_failed():
                failures.append(f"copy: {state.message}")
            else:
                result = state.result()
                sections["copy"] = copy_probe.markdown(result, "copy/" + copy_probe.PLOT)
        if "grpo" in found:
            results = []
            for index in range(seeds):
                recipe = load_recipe(found["grpo"], [f"seed={load_recipe(found['grpo']).seed + index}"] if index else [])
                state = pipeline(recipe_path=found["grpo"], overrides=recipe.overrides, runs_dir=str(runs_dir), return_state=True)
                if state.is_failed():
                    failures.append(f"grpo seed {recipe.seed}: {state.message}")
                    continue
                result = grpo_probe.grpo_result(runs_dir, recipe)
                if result is not None:
                    results.append(result)
            if results:
                grpo_probe.plot(results, out / "grpo_rewards.png")
            sections["grpo"] = grpo_probe.markdown(results, "grpo_rewards.png" if results else None)
        text = report_markdown(sections, failures)
        md_path, html_path = out / "probes.md", out / "probes.html"
        md_path.write_text(text, encoding="utf-8")
        html_path.write_text(markdown_to_html(text, out, "dsv3 probes"), encoding="utf-8")
        create_markdown_artifact(key="dsv3-probes", markdown=text, description=f"probe tables; {html_path} has the plots")
        for path in (md_path, html_path):
            tracker.log_artifact(top_id, path)
    logger.info("probes: %s", md_path)
    if failures:
        message = f"probes failed: {'; '.join(failures)}"
        return Failed(message=message, data={"failure": {"kind": "check", "message": message}})
    return md_path


def probe_recipes(recipes_dir: str | Path, only: list[str] | None) -> dict[str, str]:
    """{probe: recipe path} of the probes in the folder (copy.yaml, grpo.yaml), validated; ValueError naming an
    unknown file or --only name."""
    unknown = sorted(set(only or ()) - set(PROBES))
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: not a probe; choose from {', '.join(PROBES)}")
    paths = sorted(Path(recipes_dir).glob("*.yaml"))
    if not paths:
        raise ValueError(f"{recipes_dir}: no recipes (*.yaml); pass the folder of the probe recipes")
    found = {}
    for path in paths:
        if path.stem not in PROBES:
            raise ValueError(f"{path}: not a probe; name the file one of {', '.join(PROBES)}.yaml")
        if only is None or path.stem in only:
            found[path.stem] = str(path)
    if "copy" in found:
        copy_probe.load_copy_recipe(found["copy"])
    if "grpo" in found:
        recipe = load_recipe(found["grpo"])
        if recipe.pipeline.stages[-1] != "rl":
            raise ValueError(f"{found['grpo']}: the GRPO probe's pipeline.stages must end with rl")
    return found


def report_markdown(sections: dict[str, str], failures: list[str]) -> str:
    """The preface, then the copy probe's and the GRPO probe's sections ("missing" where one has not run)."""
    parts = [PREFACE, "", "## Copy and retrieval (recipes/probes/copy.yaml)", "",
             sections.get("copy", "missing: the copy probe has not run (`dsv3 probes --only copy`)"), "",
             "## GRPO on a task the SFT model gets partly right (recipes/probes/grpo.yaml)", "",
             sections.get("grpo", "missing: the GRPO probe has not run (`dsv3 probes --only grpo`)"), ""]  # fmt: skip
    if failures:
        parts += [f"Failed: {f} (rerun `make probes` to resume)." for f in failures]
    return "\n".join(parts)
