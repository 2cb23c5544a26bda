"""What the store runs: a stage's declaration (`Stage`) and what its run hands back (`StageResult`).

A stage module (`dsv3/stages/<name>.py`, or a plugin's module) exports one `STAGE = Stage(...)`: the recipe sections
hashed into its key, the stages it reads, its outputs, its health checks and headline metrics, and its `run`. The store
runs any `Stage` it is handed and imports no stage itself (docs/design.md, "Layers").
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsv3.config import Section

Measure = Callable[[dict], "float | None"]


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


@dataclass(frozen=True)
class Stage:
    """One stage, declared by its module.

    name      the stage's name: its folder, its recipe section and its `checks.<name>` section
    run       run(recipe, workdir, inputs) -> StageResult; `workdir` is its folder, `inputs` maps each upstream
              stage to its folder. Its module (and the library it imports) is the code hashed into the key.
    sections  recipe sections whose values decide its output (hashed into its key)
    inputs    upstream stages whose outputs it reads, or a function recipe -> those stages
    outputs   what it leaves for later stages (paths in its folder; each must exist when it finishes)
    checks    checks.<name>.<field> -> how that field's value is measured from its metrics (`min_x` a lower
              bound, `max_x` an upper one; dsv3.store.health)
    headline  the metrics that say whether it worked (a name ending in "_" is a prefix)
    tunable   sections a diverged run may change and still resume from its last checkpoint
    data_files  recipe -> the local files it reads (their content is part of its key)
    note      one line the report card prints under its metrics (what a number means where it could mislead)
    section   a stage declared outside dsv3/stages/: its recipe section `<name>:`, a dsv3.config.Section class
              (a built-in stage's is its entry in dsv3.config.STAGES); null in a recipe until set, unless
              section_on_by_default
    checks_section  the same for the thresholds `checks.<name>.<field>` that `checks` measures
    """

    name: str
    run: Callable[..., StageResult]
    sections: tuple[str, ...]
    inputs: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()
    outputs: tuple[str, ...] = ()
    checks: Mapping[str, Measure] = field(default_factory=lambda: MappingProxyType({}))
    headline: tuple[str, ...] = ()
    tunable: tuple[str, ...] = ()
    data_files: Callable[[Any], list[str]] | None = None
    note: str = ""
    section: type[Section] | None = None
    checks_section: type[Section] | None = None
    section_on_by_default: bool = False

    def upstream(self, recipe) -> tuple[str, ...]:
        """The stages it reads for this recipe."""
        return tuple(self.inputs(recipe)) if callable(self.inputs) else tuple(self.inputs)

    def files(self, recipe) -> list[str]:
        """The local files it reads for this recipe."""
        return list(self.data_files(recipe)) if self.data_files else []

    @property
    def module(self) -> ModuleType:
        """The module that defines its run: the code its key hashes."""
        return sys.modules[self.run.__module__]

    @property
    def description(self) -> str:
        """The first line of its module's docstring."""
        return (self.module.__doc__ or f"{self.name} stage").strip().split("\n")[0]

    def headline_of(self, metrics: dict[str, float]) -> dict[str, float]:
        """Its headline metrics present in `metrics`, in `headline` order (an entry ending in "_" is a prefix)."""
        return {
            k: metrics[k]
            for entry in self.headline
            for k in sorted(metrics, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
            if (k.startswith(entry) if entry.endswith("_") else k == entry)
        }


def metric(name: str) -> Measure:
    """A check measured as the metric `name` itself."""
    return lambda metrics: metrics.get(name)


def ratio(numerator: str, denominator: str) -> Measure:
    """A check measured as one metric over another (None when either is missing or the denominator is 0)."""

    def measure(metrics: dict) -> float | None:
        if numerator not in metrics or not metrics.get(denominator):
            return None
        return metrics[numerator] / metrics[denominator]

    return measure
