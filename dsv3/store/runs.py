"""The runs folder: variants of a recipe side by side, stage folders shared between the variants that agree.

    runs/
      stages/<stage>/<id>/            every stage's folder (outputs, checkpoints, stage.json), named by the key it
                                      was first run with; any variant whose stage has that key uses it as it is
      stages/cache/                   tokenised, packed data (Arrow), keyed by its content
      <recipe>/<variant>/<stage>      -> ../../stages/<stage>/<id>: the stage folder this variant's run used
      <recipe>/<variant>/run.json     what the variant is: recipe file, overrides, the resolved recipe, when it ran
      <recipe>/<variant>/report.md    the report card (and report.html)
      <recipe>/latest                 -> the variant run last
      mlflow.db, mlartifacts/, prefect/

A variant is a resolved recipe: `--name` names it, else its overrides do (`lr_peak=1e-3-3fa2c1`; `base-...` with
none) followed by a digest of everything it resolves to, so a run that changes anything — an override, an edit
of the recipe file — gets a folder of its own and never overwrites another; the stages it shares with earlier
variants are reused from the store, not copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dsv3 import config
from dsv3.config import Recipe, flatten, is_hardware, stage_order, without_hardware
from dsv3.errors import InputError
from dsv3.io import write_json_atomic
from dsv3.store.health import Check
from dsv3.store.manifest import Manifest, read_manifest

STORE, LATEST, RUN_INFO, CACHE = "stages", "latest", "run.json", "cache"


def recipe_digest(recipe: Recipe) -> str:
    """Six hex digits of sha256 over everything the recipe resolves to (its name and variant label aside, and its
    HARDWARE settings: devices, strategy, ... do not make another variant). A registered stage the recipe does not
    run is left out, so installing a plugin renames no run."""
    unused = {name for name in config.REGISTERED if name not in recipe.pipeline.stages}
    payload = recipe.model_dump(mode="json", exclude={"name", "variant", "overrides", *unused})
    payload["checks"] = {name: value for name, value in payload["checks"].items() if name not in unused}
    payload = {name: without_hardware(name, section) for name, section in payload.items()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:6]


def variant_name(recipe: Recipe) -> str:
    """`recipe.variant` (set by --name), else the overrides as a short label plus the recipe digest (overrides of
    HARDWARE settings left out: a run resumed on another number of processes is the same variant)."""
    if recipe.variant:
        return recipe.variant
    labels = [re.sub(r"[^A-Za-z0-9_.=-]+", "_", item.split("=", 1)[0].rsplit(".", 1)[-1] + "=" + item.split("=", 1)[-1])
              for item in recipe.overrides if not is_hardware(item.split("=", 1)[0].strip())]  # fmt: skip
    label = "+".join(labels)[:40].strip("+_") or "base"
    return f"{label}-{recipe_digest(recipe)}"


def run_root(runs_dir: str | Path, recipe: Recipe) -> Path:
    """`runs/<recipe>/<variant>/`: the folder of this variant's run (its stages are links into the store)."""
    return Path(runs_dir).resolve() / recipe.name / variant_name(recipe)


def store(runs_dir: str | Path, stage: str) -> Path:
    return Path(runs_dir).resolve() / STORE / stage


def shared_cache(workdir: Path) -> Path:
    """The Arrow cache every stage folder of the store shares: runs/stages/cache."""
    return Path(workdir).resolve().parent.parent / CACHE


def link_stage(root: Path, stage: str, folder: Path) -> None:
    """Point `root/stage` at `folder` (a relative symlink, replaced atomically); a real folder there stays."""
    link = root / stage
    if link.resolve() == folder.resolve():
        return
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{stage}.link"
    partial.unlink(missing_ok=True)
    partial.symlink_to(os.path.relpath(folder, root))
    os.replace(partial, link)


def record_run(runs_dir: str | Path, recipe: Recipe, recipe_path: str | Path | None) -> Path:
    """Write `run.json` of the variant (kept: created; updated: now) and point `<recipe>/latest` at it."""
    root = run_root(runs_dir, recipe)
    root.mkdir(parents=True, exist_ok=True)
    previous = read_run_info(root)
    now = time.time()
    write_json_atomic(
        root / RUN_INFO,
        {
            "recipe": recipe.name,
            "variant": root.name,
            "recipe_path": str(recipe_path) if recipe_path else None,
            "overrides": list(recipe.overrides),
            "recipe_digest": recipe_digest(recipe),
            "created": previous.get("created", now),
            "updated": now,
            "resolved": recipe.model_dump(mode="json"),
        },
        indent=2,
    )
    link_stage(root.parent, LATEST, root)
    return root


def read_run_info(root: Path) -> dict:
    try:
        return json.loads((Path(root) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class RunView:
    """One variant as `dsv3 runs` and `dsv3 compare` see it."""

    root: Path
    info: dict
    manifests: dict[str, Manifest | None]

    @property
    def label(self) -> str:
        return f"{self.root.parent.name}/{self.root.name}"

    def status(self, stage: str) -> str:
        """completed (* = a check failed, not enforced), failed, interrupted, running, or — (no manifest)."""
        manifest = self.manifests.get(stage)
        if manifest is None:
            return "—"
        if manifest.failure is not None and manifest.failure["kind"] == "interrupted":
            return "interrupted"
        return manifest.status + ("*" if manifest.status == "completed" and manifest.failed_checks else "")

    def reason(self, stage: str) -> str | None:
        """Why the stage failed, in one line: its failed checks with their values, else the failure's message."""
        manifest = self.manifests.get(stage)
        if manifest is None or manifest.status != "failed" or manifest.failure is None:
            return None
        if manifest.failure["kind"] == "check" and manifest.failed_checks:
            return "; ".join(Check(**c).line() for c in manifest.failed_checks)
        return manifest.failure["message"]


def view(root: Path) -> RunView:
    stages = [s for s in stage_order() if (root / s).exists()]
    return RunView(root, read_run_info(root), {s: read_manifest(root / s) for s in stages})


def list_runs(runs_dir: str | Path) -> list[RunView]:
    """Every variant folder under runs/ (those with a run.json), newest first."""
    roots = [p.parent for p in Path(runs_dir).glob(f"*/*/{RUN_INFO}") if p.parent.parent.name != STORE]
    views = [view(root) for root in roots if root.name != LATEST]
    return sorted(views, key=lambda v: v.info.get("updated", 0), reverse=True)


def resolve_run(spec: str | Path, runs_dir: str | Path) -> Path:
    """The variant folder `spec` names: a folder, `<recipe>/<variant>`, or a recipe name (its latest variant)."""
    for candidate in (Path(spec), Path(runs_dir) / str(spec), Path(runs_dir) / str(spec) / LATEST):
        if (candidate / RUN_INFO).is_file():
            return candidate.resolve()
    known = ", ".join(v.label for v in list_runs(runs_dir)[:8]) or "none yet"
    raise InputError(f"{spec}: no run of that name under {runs_dir} (runs: {known}); see `dsv3 runs`")


def recipe_differences(a: RunView, b: RunView) -> dict[str, tuple]:
    """{dotted key: (value in a, value in b)} where the two resolved recipes differ (name and variant aside)."""
    flat_a, flat_b = flatten(a.info.get("resolved", {})), flatten(b.info.get("resolved", {}))
    keys = sorted((set(flat_a) | set(flat_b)) - {"name", "variant", "overrides"})
    return {k: (flat_a.get(k), flat_b.get(k)) for k in keys if flat_a.get(k) != flat_b.get(k)}
