"""Run one stage under the manifest contract: skip it, resume it, or run it from scratch — then judge it.

- completed, same key, outputs intact  -> skipped (the MLflow parent run is tagged with the producing run)
- failed its checks, same key, outputs intact -> judged again (a changed threshold or `checks.enforce: false`
  settles it without rerunning)
- running/failed with the same key     -> resumed: the stage finds its own checkpoints in its folder
- diverged, and since then only its tunable sections changed (e.g. a lower LR) -> resumed from its last checkpoint
- anything else (new key, corrupt or missing outputs, no manifest) -> the folder is cleared and it runs

The key covers the stage's recipe sections, its inputs' output hashes, its code and the content of the local
files it reads (dsv3.store.keyed). A stage whose health checks (dsv3.store.health) fail is marked failed — outputs kept for
inspection — and StageFailed is raised with one line naming the check and the measured value.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import dsv3
from dsv3.config import Recipe, flatten
from dsv3.errors import StageFailed, classify
from dsv3.store.fingerprint import content_hash
from dsv3.store.health import judge
from dsv3.store.keyed import code_hash
from dsv3.store.manifest import (
    MANIFEST_NAME,
    Manifest,
    StageKey,
    hash_outputs,
    is_trusted,
    outputs_intact,
    read_manifest,
    write_manifest,
)
from dsv3.store.runs import link_stage, run_root, store
from dsv3.store.stage import Stage, StageResult
from dsv3.tracking import Tracker

MODEL = "model"  # the save_pretrained folder a training stage writes: registered in MLflow
STAGE_LOG = "stage.log"


class StageInputError(RuntimeError):
    """An upstream stage's output is missing or untrusted."""


@dataclass
class StageOutcome:
    stage: str
    action: Literal["ran", "resumed", "skipped", "rejudged"]
    manifest: Manifest
    workdir: Path
    summary: str = ""


def stage_key(stage: Stage, recipe: Recipe, root: Path) -> StageKey:
    """Hash of the stage's recipe sections, its inputs' output hashes, its code and the local files it reads."""
    input_hashes = {}
    for upstream in stage.upstream(recipe):
        manifest = read_manifest(root / upstream)
        if manifest is None or manifest.status != "completed":
            raise StageInputError(
                f"stage {stage.name} needs the output of {upstream}: run the pipeline up to {upstream}"
            )
        input_hashes[upstream] = manifest.output_hash
    data = content_hash(stage.files(recipe), root.parent)
    return StageKey(recipe.section_hash(*stage.sections), input_hashes, code_hash(stage.module), data)


def fixed_hash(stage: Stage, recipe: Recipe, key: StageKey) -> str:
    """The key without the stage's tunable sections: equal before and after a fix that a diverged run may resume
    under (same model, data, inputs and code; e.g. only the LR changed)."""
    fixed = recipe.section_hash(*(s for s in stage.sections if s not in stage.tunable))
    return hashlib.sha256(f"{fixed}{key.input_hashes}{key.data_hash}".encode()).hexdigest()


def code_version() -> str:
    """The git commit of the code (with -dirty for local changes), or the package version outside git."""

    def git(*args: str) -> str:
        here = Path(dsv3.__file__).parent
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return f"dsv3-{dsv3.__version__}"


def run_stage(
    stage: Stage, recipe: Recipe, runs_dir: str | Path, tracker: Tracker | None = None
) -> StageOutcome:
    """Skip, resume or run `stage` for `recipe`, writing its manifest, tracking it and judging its checks."""
    name = stage.name
    root = run_root(runs_dir, recipe)
    key = stage_key(stage, recipe, root)
    fixed = fixed_hash(stage, recipe, key)
    workdir, previous = stage_folder(runs_dir, name, key, fixed, root / name)
    link_stage(root, name, workdir)

    if is_trusted(previous, key, workdir) or (
        previous is not None
        and previous.key == key
        and previous.failure is not None
        and previous.failure["kind"] == "check"
        and outputs_intact(previous, workdir)
    ):
        assert previous is not None
        action = "skipped" if previous.status == "completed" else "rejudged"
        settle(stage, previous, recipe, workdir)
        if tracker:
            tracker.mark_reused(name, previous.mlflow_run_id)
        return StageOutcome(name, action, previous, workdir)

    resuming = previous is not None and previous.status in ("running", "failed") and (
        previous.key == key
        or (previous.failure is not None and previous.failure["kind"] == "diverged" and previous.fixed_hash == fixed)
    )
    if not resuming and workdir.exists():
        shutil.rmtree(workdir)
    manifest = Manifest(
        stage=name,
        status="running",
        key=key,
        code_version=code_version(),
        started_at=time.time(),
        attempts=previous.attempts + 1 if resuming and previous else 1,
        fixed_hash=fixed,
    )
    inputs = {upstream: root / upstream for upstream in stage.upstream(recipe)}
    params = {"seed": recipe.seed} | {
        k: v for s in stage.sections for k, v in flatten(getattr(recipe, s), s).items()
    }

    if tracker is None:
        result = _execute(stage, recipe, workdir, inputs, manifest)
        raise_if_failed(manifest)
    else:
        lineage = {f"dsv3.input.{u}": (read_manifest(folder) or manifest).mlflow_run_id or "" for u, folder in inputs.items()}
        with tracker.stage_run(name, params, tags={"dsv3.output_dir": tracker.relative(workdir), **lineage}) as run_id:
            manifest.mlflow_run_id = run_id
            with tracker.system_metrics(run_id):
                result = _execute(stage, recipe, workdir, inputs, manifest)
            tracker.log_datasets(run_id, result.data)
            tracker.log_metrics(run_id, manifest.metrics)
            tracker.log_artifact(run_id, workdir / MANIFEST_NAME)
            tracker.log_artifact(run_id, workdir / STAGE_LOG)
            for artifact in result.artifacts:
                tracker.log_artifact(run_id, workdir / artifact, artifact_path="plots")
            tracker.set_tags(run_id, {"dsv3.checks": checks_tag(manifest)})
            raise_if_failed(manifest)  # inside the run: MLflow marks it FAILED
            if (workdir / MODEL).is_dir():
                tracker.register_model(
                    run_id,
                    registered_name(recipe, name),
                    workdir / MODEL,
                    model_tags(tracker, root, workdir, key),
                    description=version_description(stage, manifest, tracker, root, workdir),
                    model_description=registered_description(recipe, stage),
                    model_tags={"dsv3.recipe": recipe.name, "dsv3.stage": name},
                )
    return StageOutcome(name, "resumed" if resuming else "ran", manifest, workdir, result.summary)


def registered_name(recipe: Recipe, stage: str) -> str:
    """The MLflow registered model a stage's model is a version of."""
    return f"dsv3-{recipe.name}-{stage}"


def model_tags(tracker: Tracker, root: Path, workdir: Path, key: StageKey) -> dict[str, str]:
    """Tags of a registered model version: the run (variant) folder and the stage's own folder, relative to the runs
    folder, and the stage's key."""
    return {"dsv3.run_folder": tracker.relative(root), "dsv3.stage_folder": tracker.relative(workdir), "dsv3.stage_key": key.digest()}


def registered_description(recipe: Recipe, stage: Stage) -> str:
    """The registered model's description in MLflow's UI: what its versions are and how they are tagged."""
    what = stage.description.split(" (")[0].rstrip(".")
    return (
        f"{what} of the dsv3 recipe `{recipe.name}`: a version per run that trained it, its source run the stage's "
        "MLflow run (nested under the variant's pipeline run). Version tags: `dsv3.run_folder` (the variant) and "
        "`dsv3.stage_folder` (the model is its `model/`), both relative to the runs folder, and `dsv3.stage_key`. "
        f"`models:/{registered_name(recipe, stage.name)}/latest` loads the newest."
    )


def version_description(stage: Stage, manifest: Manifest, tracker: Tracker, root: Path, workdir: Path) -> str:
    """A model version's description: the variant (first: what the versions table shows) and stage folder that
    wrote it, the code, the headline metrics."""
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in stage.headline_of(manifest.metrics).items())
    return (  # plain text: the UI's versions table shows its start unrendered
        f"Run {tracker.relative(root)}, stage {stage.name} (folder {tracker.relative(workdir)}, code "
        f"{manifest.code_version})" + (f": {metrics}." if metrics else ".")
    )


def stage_folder(runs_dir, name: str, key: StageKey, fixed: str, current: Path) -> tuple[Path, Manifest | None]:
    """The store folder stage `name` runs in for `key`, and its manifest: one that finished (or failed its checks)
    with this key; else one that stopped part-way with it, or diverged under the same fixed sections (this
    variant's own first); else a new folder named by the key. `current` is where the variant's link points now."""
    folders = [current] if current.exists() else []
    folders += [f for f in sorted(store(runs_dir, name).glob("*")) if f.is_dir() and f.resolve() != current.resolve()]
    manifests = [(f, read_manifest(f)) for f in folders]
    done = [(f, m) for f, m in manifests if m is not None and m.key == key and (m.status == "completed" or m.failure)]
    for folder, manifest in done:
        if outputs_intact(manifest, folder) and (manifest.status == "completed" or manifest.failure["kind"] == "check"):
            return folder, manifest
    for folder, manifest in manifests:
        if manifest is not None and manifest.status in ("running", "failed") and (
            manifest.key == key
            or (manifest.failure is not None and manifest.failure["kind"] == "diverged" and manifest.fixed_hash == fixed)
        ):
            return folder, manifest
    folder = store(runs_dir, name) / key.digest()[:16]
    return folder, read_manifest(folder)


def judge_into(stage: Stage, manifest: Manifest, recipe: Recipe) -> None:
    """Judge the stage's metrics against the recipe's checks and record the verdict in the manifest: completed,
    or failed with the first failed check's line (with `checks.enforce: false`, completed, failures listed)."""
    checks = judge(stage, manifest.metrics, recipe.checks)
    failed = [c for c in checks if not c.passed]
    manifest.checks = [c.to_json() for c in checks]
    if failed and recipe.checks.enforce:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        line = f"stage {stage.name} failed its health check {failed[0].line()}{more}"
        manifest.status, manifest.failure = "failed", {"kind": "check", "message": line}
    else:
        manifest.status, manifest.failure = "completed", None


def settle(stage: Stage, manifest: Manifest, recipe: Recipe, workdir: Path) -> None:
    """Judge a finished stage again (thresholds may have changed), rewrite its manifest if the verdict did."""
    before = (manifest.status, manifest.checks, manifest.failure)
    judge_into(stage, manifest, recipe)
    if (manifest.status, manifest.checks, manifest.failure) != before:
        write_manifest(workdir, manifest)
    raise_if_failed(manifest)


def raise_if_failed(manifest: Manifest) -> None:
    if manifest.status == "failed":
        raise StageFailed(manifest.failure["message"])


def checks_tag(manifest: Manifest) -> str:
    """passed | failed | failed-ignored (checks.enforce false): how the stage's health checks came out."""
    if not manifest.failed_checks:
        return "passed"
    return "failed" if manifest.status == "failed" else "failed-ignored"


@contextmanager
def stage_log(workdir: Path) -> Iterator[None]:
    """Every log record that reaches the root logger while the stage runs (dsv3's progress lines, Lightning's)
    also goes to `<stage>/stage.log`, appended across attempts: the whole log, whatever the terminal shows."""
    handler = logging.FileHandler(workdir / STAGE_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextmanager
def library_bars_off() -> Iterator[None]:
    """No progress bars from datasets (map, filter, save_to_disk: TRL's dataset preparation too) or transformers
    (loading weights, writing model shards at every checkpoint) while a stage runs: each call drew a bar of its own,
    so the terminal filled with bars for a few milliseconds of work. The stage's training bar (Lightning's, or
    transformers' Trainer through tqdm itself) and its log lines stay."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_off, transformers_on = datasets.are_progress_bars_disabled(), transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_off:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers_logging.enable_progress_bar()


def _execute(stage: Stage, recipe: Recipe, workdir: Path, inputs: dict[str, Path], manifest: Manifest) -> StageResult:
    """Run the stage and write its manifest: running, then completed or failed (judged by its checks)."""
    write_manifest(workdir, manifest)
    try:
        with stage_log(workdir), library_bars_off():
            result: StageResult = stage.run(recipe, workdir, inputs)
        manifest.outputs = hash_outputs(workdir, list(dict.fromkeys([*stage.outputs, *result.outputs])))
    except BaseException as error:
        manifest.status = "failed"
        manifest.failure = asdict(classify(error, workdir))
        manifest.finished_at = time.time()
        try:
            write_manifest(workdir, manifest)
        except OSError:
            pass  # e.g. a full disk: the manifest on disk still says running, which resumes the same way
        raise
    manifest.metrics = {k: float(v) for k, v in result.metrics.items()}
    manifest.artifacts = list(result.artifacts)
    manifest.finished_at = time.time()
    manifest.metrics["stage_seconds"] = manifest.finished_at - (manifest.started_at or manifest.finished_at)
    judge_into(stage, manifest, recipe)
    write_manifest(workdir, manifest)
    return result
