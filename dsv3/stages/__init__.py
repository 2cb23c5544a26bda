"""The pipeline's stages: each module `dsv3.stages.<name>` declares itself with one `STAGE = Stage(...)`
(dsv3.store.stage: its sections, inputs, outputs, how its checks are measured, headline metrics and run); a built-in
stage's recipe section and checks' thresholds are its entry in dsv3.config.STAGES, so that reading a recipe imports
no stage module (torch). A stage declared outside dsv3 is one module whose `Stage` also carries its section and
checks, added by `register` or found through the entry-point group `dsv3.stages`. This package finds a stage's
declaration by its name; the store (dsv3.store.runner) decides whether to skip, resume or rerun it, and a stage knows
nothing of Prefect (docs/design.md, "Stages").
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from pathlib import Path

from dsv3 import config
from dsv3.errors import InputError
from dsv3.store.stage import Stage

ENTRY_POINTS = "dsv3.stages"  # an installed package's stages: name = the stage's name, value = "module:STAGE"
REGISTERED: dict[str, Stage] = {}  # stages declared outside dsv3/stages/ (register), by name


def register(stage: Stage) -> None:
    """Add a stage declared outside dsv3/stages/ (a plugin's, a test's): it runs after the built-in stages, and its
    `section` and `checks_section` join the recipe schema as `<name>:` and `checks.<name>:`. `unregister` takes it
    away."""
    config.add_stage_schema(
        stage.name, config.StageSchema(stage.section, stage.checks_section, stage.section_on_by_default)
    )
    REGISTERED[stage.name] = stage


def unregister(name: str) -> None:
    REGISTERED.pop(name, None)
    config.remove_stage_schema(name)


@functools.cache
def discover() -> None:
    """Register the stages installed packages publish under the entry-point group `dsv3.stages`; once per process,
    when a recipe is first validated (dsv3.config.validate_recipe). One that cannot be loaded is a RecipeError naming
    its entry point (and is tried again next time)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        where = f"entry point {entry.name} = {entry.value} (group {ENTRY_POINTS}, package {entry.dist.name})"
        try:
            stage = entry.load()
        except Exception as err:  # a plugin's own bug or missing dependency: one line, not its traceback
            why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            raise config.RecipeError(f"{where}: cannot load it ({why}); mend or uninstall it") from None
        if not isinstance(stage, Stage) or stage.name != entry.name:
            raise config.RecipeError(f"{where}: must name a dsv3.store.Stage called {entry.name!r}")
        try:
            register(stage)
        except ValueError as err:  # a name or section add_stage_schema refuses
            raise config.RecipeError(f"{where}: {err}") from None


def available_stages() -> list[str]:
    """The stages a recipe may name that are built, in order."""
    return [
        name for name in config.stage_order()
        if name in REGISTERED or importlib.util.find_spec(f"dsv3.stages.{name}") is not None
    ]  # fmt: skip


def get_stage(name: str) -> Stage:
    """The declaration of stage `name`."""
    if name in REGISTERED:
        return REGISTERED[name]
    if name not in config.STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(config.stage_order())})")
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
