"""Health checks: what a stage's own metrics must show before the runner marks it completed (docs/design.md, "Health").

Every stage needs finite losses (`nonfinite_losses` = 0: each stage counts the non-finite values among the losses
it logged). Then the thresholds of the recipe's `checks.<stage>` section, each measured from the stage's metrics as
its declaration says (`Stage.checks`): a field `min_x` is a lower bound, `max_x` an upper bound.

A metric the stage did not report (e.g. no perplexity at the pretraining length), or a threshold the recipe leaves
null, leaves its check out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dsv3.store.stage import Stage

NONFINITE = "nonfinite_losses"


@dataclass(frozen=True)
class Check:
    """One judged threshold: `name` is its recipe key (checks.<stage>.<field>), or <stage>.nonfinite_losses."""

    name: str
    value: float
    limit: float
    passed: bool

    def line(self) -> str:
        bound = "≥" if self.name.rsplit(".", 1)[-1].startswith("min_") else "≤"
        return f"{self.name}: measured {self.value:.4g}, needs {bound} {self.limit:g}"

    def to_json(self) -> dict:
        return asdict(self)


def judge(stage: Stage, metrics: dict[str, float], checks) -> list[Check]:
    """Every check of `stage` on its metrics, in order: finite losses first, then the thresholds of the recipe's
    `checks` section."""
    name = stage.name
    judged = [Check(f"{name}.{NONFINITE}", metrics.get(NONFINITE, 0.0), 0.0, metrics.get(NONFINITE, 0.0) == 0)]
    limits = getattr(checks, name, None)
    for field, measure in stage.checks.items():
        value = measure(metrics)
        if value is None:
            continue
        limit = getattr(limits, field, None)
        if limit is None:  # a check the recipe leaves off
            continue
        within = value >= limit if field.startswith("min_") else value <= limit
        judged.append(Check(f"checks.{name}.{field}", float(value), float(limit), math.isfinite(value) and within))
    return judged


def count_nonfinite(values) -> int:
    """How many of `values` are NaN or infinite (the stages' `nonfinite_losses` metric)."""
    return sum(1 for v in values if not math.isfinite(float(v)))


def logged_losses(history: list[dict[str, float]]) -> list[float]:
    """Every loss a training-loop history logged (training terms, validation, MTP depths): what must stay finite."""
    return [v for row in history for k, v in row.items() if "loss" in k or k in ("train/ce", "train/balance")]
