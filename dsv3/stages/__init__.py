"""The pipeline's stages: each module `dsv3.stages.<name>` declares itself with one `STAGE = Stage(...)`
(dsv3.store.stage: its sections, inputs, outputs, checks, headline metrics and run). This package finds a stage's
declaration by its name; the store (dsv3.store.runner) decides whether to skip, resume or rerun it, and a stage
knows nothing of Prefect (docs/design.md, "Layers").
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from dsv3 import STAGE_ORDER
from dsv3.errors import InputError
from dsv3.store.stage import Stage

EXTRA: dict[str, Stage] = {}  # stages declared outside dsv3/stages/ (a test's toy stage), by name


def available_stages() -> list[str]:
    """The stages of STAGE_ORDER that are built, in order."""
    return [name for name in STAGE_ORDER if name in EXTRA or importlib.util.find_spec(f"dsv3.stages.{name}") is not None]


def get_stage(name: str) -> Stage:
    """The declaration of stage `name`."""
    if name in EXTRA:
        return EXTRA[name]
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGE_ORDER)})")
    if name not in available_stages():
        raise ValueError(f"stage {name!r} is not built yet (built: {', '.join(available_stages())})")
    return importlib.import_module(f"dsv3.stages.{name}").STAGE


def run_stage(name: str, recipe, runs_dir, tracker=None):
    """Skip, resume or run stage `name` of `recipe` (dsv3.store.runner.run_stage)."""
    from dsv3.store.runner import run_stage as run_declared

    return run_declared(get_stage(name), recipe, runs_dir, tracker)


def stage_key(name: str, recipe, root: Path):
    """The key stage `name` of `recipe` would run under (dsv3.store.runner.stage_key)."""
    from dsv3.store.runner import stage_key as key_of_declared

    return key_of_declared(get_stage(name), recipe, root)


def check_data_files(recipe, stages: list[str]) -> None:
    """Before a run starts: every local file the stages would read exists (InputError naming the first that does
    not)."""
    for name in stages:
        for path in get_stage(name).files(recipe):
            if not Path(path).expanduser().exists():
                raise InputError(
                    f"{path} does not exist (the {name} stage reads it; paths are relative to the working directory)"
                )


def headline(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """Stage `name`'s headline metrics present in `metrics`, in its declared order."""
    return get_stage(name).headline_of(metrics)
