"""Health checks: what a stage's own metrics must show before the runner marks it completed (docs/design.md, "Health").

Every stage needs finite losses (`nonfinite_losses` = 0: each stage counts the non-finite values among the losses
it logged). Then per stage, thresholds from the recipe's `checks:` section — a field `min_x` is a lower bound and
`max_x` an upper bound on the value measured from the stage's metrics:

    tokenizer  min_bytes_per_token   bytes per token on held-out text
    pretrain   max_val_loss_ratio    final validation loss ÷ the unigram baseline's loss
               min_induction_gain    first- minus second-copy loss of repeated random tokens (nats)
               min_mtp_acceptance    MTP drafts accepted in greedy speculative decoding on held-out text
    extend     max_ppl_increase      perplexity at the pretraining length, after ÷ before − 1
               min_passkey_accuracy_4x  passkey accuracy after extension at 4x the pretraining length
    sft        min_accuracy          held-out greedy accuracy
               min_format_rate       held-out answers that end in one \\boxed{}
               max_truncated_rate    held-out answers that used the whole generation budget
    reward     min_pair_accuracy     held-out preference pairs ranked right
    rl         max_truncated_rate    GRPO rollouts that used the whole completion budget (mean over the run)

A metric the stage did not report (e.g. no perplexity at the pretraining length), or a threshold the recipe leaves
null, leaves its check out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from dsv3.config import ChecksSection

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


def ratio(numerator: str, denominator: str) -> Callable[[dict], float | None]:
    def measure(metrics: dict) -> float | None:
        if numerator not in metrics or not metrics.get(denominator):
            return None
        return metrics[numerator] / metrics[denominator]

    return measure


def metric(name: str) -> Callable[[dict], float | None]:
    return lambda metrics: metrics.get(name)


# checks.<stage>.<field> -> how its value is measured from the stage's metrics
MEASURES: dict[str, dict[str, Callable[[dict], float | None]]] = {
    "tokenizer": {"min_bytes_per_token": metric("bytes_per_token_validation")},
    "pretrain": {
        "max_val_loss_ratio": ratio("final_val_loss", "unigram_val_loss"),
        "min_induction_gain": metric("induction_gain"),
        "min_mtp_acceptance": metric("mtp_acceptance"),
    },
    "extend": {
        "max_ppl_increase": metric("ppl_change_at_original_length"),
        "min_passkey_accuracy_4x": metric("passkey_accuracy_after_4x"),
    },
    "sft": {
        "min_accuracy": metric("heldout_accuracy"),
        "min_format_rate": metric("heldout_format_rate"),
        "max_truncated_rate": metric("heldout_truncated_rate"),
    },
    "reward": {"min_pair_accuracy": metric("heldout_pair_accuracy")},
    "rl": {"max_truncated_rate": metric("rollout_truncated_rate")},
}


def judge(stage: str, metrics: dict[str, float], checks: ChecksSection) -> list[Check]:
    """Every check of `stage` on its metrics, in order: finite losses first, then the recipe's thresholds."""
    judged = [Check(f"{stage}.{NONFINITE}", metrics.get(NONFINITE, 0.0), 0.0, metrics.get(NONFINITE, 0.0) == 0)]
    limits = getattr(checks, stage, None)
    for field, measure in MEASURES.get(stage, {}).items():
        value = measure(metrics)
        if value is None:
            continue
        limit = getattr(limits, field)
        if limit is None:  # a check the recipe leaves off
            continue
        within = value >= limit if field.startswith("min_") else value <= limit
        judged.append(Check(f"checks.{stage}.{field}", float(value), float(limit), math.isfinite(value) and within))
    return judged


def count_nonfinite(values) -> int:
    """How many of `values` are NaN or infinite (the stages' `nonfinite_losses` metric)."""
    return sum(1 for v in values if not math.isfinite(float(v)))


def logged_losses(history: list[dict[str, float]]) -> list[float]:
    """Every loss a training-loop history logged (training terms, validation, MTP depths): what must stay finite."""
    return [v for row in history for k, v in row.items() if "loss" in k or k in ("train/ce", "train/balance")]
