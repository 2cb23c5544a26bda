"""Pipeline stages. Each stage is a module `dsv3.stages.<name>` exposing

    SECTIONS: tuple[str, ...]   recipe sections whose values decide its output (hashed into its key)
    HEADLINE: tuple[str, ...]   the metrics that say whether it worked (a name ending in "_" is a prefix): the
              report card's summary and the MLflow parent run show these
    INPUTS:   tuple[str, ...]   upstream stages whose outputs it reads — or, when that depends on the
              recipe, a function `inputs(recipe) -> tuple[str, ...]` instead
    run(recipe, workdir, inputs) -> StageResult

`workdir` is `runs/<recipe>/<stage>/`; `inputs` maps each upstream stage to its folder. A stage knows
nothing of Prefect; the runner (`dsv3.stages.runner`) decides whether to skip, resume or rerun it.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from dsv3.config import STAGE_ORDER
from dsv3.errors import InputError


@dataclass
class StageData:
    """A dataset a stage read, for MLflow's run inputs: its rows (a `datasets.Dataset`), where they came from (a
    local file or folder, `hf:<name>`, or the dsv3 function that generated them) and the context it was read in."""

    rows: Any
    source: str
    context: str = "training"


@dataclass
class StageResult:
    """What a stage hands back: outputs later stages read, metrics, artifacts (plots) to log, and the datasets it
    read (name -> StageData)."""

    outputs: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    summary: str = ""
    data: dict[str, StageData] = field(default_factory=dict)


def available_stages() -> list[str]:
    """The stages of STAGE_ORDER that are built, in order."""
    return [name for name in STAGE_ORDER if importlib.util.find_spec(f"dsv3.stages.{name}") is not None]


def stage_inputs(module: ModuleType, recipe) -> tuple[str, ...]:
    """The upstream stages `module` reads for this recipe."""
    return tuple(module.inputs(recipe)) if hasattr(module, "inputs") else tuple(module.INPUTS)


def get_stage(name: str) -> ModuleType:
    if name not in STAGE_ORDER:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGE_ORDER)})")
    if name not in available_stages():
        raise ValueError(f"stage {name!r} is not built yet (built: {', '.join(available_stages())})")
    return importlib.import_module(f"dsv3.stages.{name}")


def check_data_files(recipe, stages: list[str]) -> None:
    """Before a run starts: every local file the stages would read exists (InputError naming the first that does
    not). Each stage that reads local files lists them with `data_files(recipe)`."""
    for name in stages:
        module = get_stage(name)
        for path in module.data_files(recipe) if hasattr(module, "data_files") else ():
            if not Path(path).expanduser().exists():
                raise InputError(
                    f"{path} does not exist (the {name} stage reads it; paths are relative to the working directory)"
                )


def headline(name: str, metrics: dict[str, float]) -> dict[str, float]:
    """The stage's HEADLINE metrics present in `metrics`, in HEADLINE order (an entry ending in "_" is a prefix)."""
    wanted = getattr(get_stage(name), "HEADLINE", ())
    return {
        k: metrics[k]
        for entry in wanted
        for k in sorted(metrics, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
        if (k.startswith(entry) if entry.endswith("_") else k == entry)
    }
