"""Prefect wiring of dsv3.stages: the pipeline and ablation flows, the Prefect API server, the `dsv3` command."""

import os

# Before any flow imports Prefect: training progress (logger dsv3.train) goes into the flow run's logs, and the
# telemetry heartbeat only adds sqlite lock contention.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dsv3")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its database set-up and system-metrics monitor lines
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
