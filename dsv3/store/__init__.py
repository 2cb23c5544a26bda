"""The run store (docs/design.md, "Contracts": run folder): stage folders keyed by what decides their outputs, manifests,
the runs folder's layout and lock, health checks, and one way to compute or reuse a keyed result
(`dsv3.store.keyed`). It runs the `Stage` declarations it is handed and imports no stage."""

from dsv3.store.stage import Stage, StageData, StageResult, metric, ratio

__all__ = ["Stage", "StageData", "StageResult", "metric", "ratio"]
