"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The store is `sqlite:///<absolute runs dir>/mlflow.db` unless MLFLOW_TRACKING_URI is set (MLflow 3's own
default is a database in whatever folder you happen to be in, and Lightning's logger defaults to a `file:`
store that MLflow 3 rejects, so the URI is always passed explicitly). Artifacts go next to the database in
`<runs dir>/mlartifacts`.

A runs folder is portable: its tags name folders relative to the runs folder (dsv3.runs_dir relative to the
store's folder: "." for the store inside it), and MLflow, which keeps artifact locations as absolute URIs, has
them moved to wherever the folder is now when it is opened (`relocate_store`: a copied `runs/` shows its own plots
and never writes into the original).

While a stage runs, MLFLOW_TRACKING_URI and MLFLOW_RUN_ID point at its nested run, so whatever the stage
uses to log — Lightning's MLFlowLogger, transformers' MLflowCallback under TRL, a torchrun subprocess —
lands in that run without the stage knowing about the pipeline; MLflow's system-metrics monitor samples the
machine (CPU, memory, disk, network, GPU where pynvml finds one) into it every 10 s. The datasets a stage read are
its run's inputs (`mlflow.data`: name, digest, source, schema); the model it wrote is a new version of the registered
model `dsv3-<recipe>-<stage>` (`models:/dsv3-<recipe>-<stage>/latest` is the newest).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import (
    MLFLOW_DATASET_CONTEXT,
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NOTE,
)

from dsv3.errors import classify, disk_full
from dsv3.mlstore import ARTIFACTS, STORE_DB, relocate_store

PARENT_TAG = MLFLOW_PARENT_RUN_ID
GIT_COMMIT_TAG = MLFLOW_GIT_COMMIT  # MLflow shows it as the run's "Git commit"
NOTE_TAG = MLFLOW_RUN_NOTE  # the run's description in the UI
FAILURE_TAG = "dsv3.failure"  # why the run failed or was killed: one line
PIPELINE_RUNS_TAG = "dsv3.pipeline_runs"
REUSED_RUN_TAG = "dsv3.reused_run"  # on a link run: the stage run whose outputs a parent run reused  # how many pipeline runs a parent run stands for
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # vs "genai_development"
MODEL_TRAINING_VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI opens in its GenAI view without it
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch
SYSTEM_METRICS_INTERVAL_S = 10  # MLflow's default: a stage shorter than this logs no sample
RUNS_DIR_TAG = "dsv3.runs_dir"  # the runs folder a run belongs to, relative to the store's folder


def dataset_source(source: str) -> DatasetSource:
    """`hf:<name>` -> a Hugging Face dataset, an existing path -> its file URI, else the code that generated it."""
    if source.startswith("hf:"):
        return HuggingFaceDatasetSource(path=source.removeprefix("hf:"))
    if Path(source).exists():
        return resolve_dataset_source(Path(source).resolve().as_uri())
    return CodeDatasetSource(tags={"mlflow.source.name": source})


def param_values(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them: strings of at most MAX_PARAM_LENGTH characters."""
    return {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}


def tracking_uri(runs_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI if set, else the sqlite database inside the runs folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / STORE_DB}"


def store_folder(uri: str) -> Path | None:
    """The folder of a local sqlite store (`sqlite:///<path>`), else None (a server, another database)."""
    return Path(uri.removeprefix("sqlite:///")).resolve().parent if uri.startswith("sqlite:///") else None


def runs_dir_tag(runs_dir: Path, uri: str) -> str:
    """Tag dsv3.runs_dir: the runs folder relative to a local store's folder ("." for the default store inside
    it), else its absolute path (a tracking server has no folder to be relative to)."""
    folder = store_folder(uri)
    return os.path.relpath(runs_dir, folder) if folder else str(runs_dir)




def run_page(experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI (`make ui`, or DSV3_MLFLOW_UI)."""
    base = os.environ.get("DSV3_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def parent_run_page(runs_dir: str | Path, recipe: str, variant: str) -> str | None:
    """The MLflow UI page of the parent run of runs/<recipe>/<variant> (the newest, of this runs folder), or None
    where there is none. Opens the store only where it exists: creates nothing."""
    runs_dir = Path(runs_dir).resolve()
    uri = tracking_uri(runs_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    relocate_store(runs_dir)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"dsv3-{recipe}")
    if experiment is None:
        return None
    runs_tag = runs_dir_tag(runs_dir, uri)
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"]):
        tags = run.data.tags
        if run.info.run_name == f"{recipe}/{variant}" and "dsv3.stage" not in tags and tags.get(RUNS_DIR_TAG) == runs_tag:
            return run_page(experiment.experiment_id, run.info.run_id)
    return None


def stage_run() -> tuple[str, str] | None:
    """(tracking URI, run id) of the stage run in progress, for loggers inside a stage; None outside one."""
    uri, run_id = os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_RUN_ID")
    return (uri, run_id) if uri and run_id else None


class Tracker:
    """Creates the parent and nested runs of one pipeline run and logs into them."""

    def __init__(self, runs_dir: str | Path, experiment: str):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(self.runs_dir)
        self.runs_tag = runs_dir_tag(self.runs_dir, self.uri)
        relocate_store(self.runs_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment(experiment)
        self.parent_id: str | None = None

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if needed; it opens in MLflow's model-training view, not the GenAI one."""
        found = self.client.get_experiment_by_name(name)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(name, artifact_location=(self.runs_dir / ARTIFACTS).as_uri())
        )
        if found is None or found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return experiment_id

    def run_url(self, run_id: str | None) -> str | None:
        """The run's page in the MLflow UI (`make ui`, or DSV3_MLFLOW_UI)."""
        return run_page(self.experiment_id, run_id) if run_id else None

    @contextmanager
    def pipeline_run(
        self,
        run_name: str,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        reopen: bool = False,
    ) -> Iterator[str]:
        """The parent run, finished as FINISHED, FAILED or KILLED. `reopen`: rather than a second run of the same
        name, reopen the newest earlier one whose params equal `params` (its tags updated, last time's failure
        cleared, tag dsv3.pipeline_runs counting the pipeline runs it stands for)."""
        tags = {RUNS_DIR_TAG: self.runs_tag, **(tags or {})}
        earlier = self._parent_with(run_name, param_values(params or {})) if reopen else None
        if earlier is None:
            run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
            self.log_params(run_id, params or {})
            count = 1
        else:
            run_id = earlier.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            for stale in (FAILURE_TAG, NOTE_TAG, "dsv3.failed_stage"):
                if stale in earlier.data.tags:
                    self.client.delete_tag(run_id, stale)
            self.set_tags(run_id, tags)
            count = int(earlier.data.tags.get(PIPELINE_RUNS_TAG, "1")) + 1
        self.set_tags(run_id, {PIPELINE_RUNS_TAG: str(count)})
        self.parent_id = run_id
        with self._terminated(run_id):
            yield run_id

    def _parent_with(self, run_name: str, params: Mapping[str, str]):
        """The newest parent run of this runs folder named `run_name` whose params are exactly `params`, or None."""
        runs = self.client.search_runs([self.experiment_id], order_by=["attributes.start_time DESC"])
        for run in self._own(runs):
            if run.info.run_name == run_name and "dsv3.stage" not in run.data.tags and run.data.params == params:
                return run
        return None

    def _own(self, runs: list) -> list:
        """The runs of this runs folder among `runs` (compared here: MLflow's filter strings cannot quote a value
        holding both kinds of quote)."""
        return [run for run in runs if run.data.tags.get(RUNS_DIR_TAG) == self.runs_tag]

    def relative(self, path: str | Path) -> str:
        """`path` relative to the runs folder, as tags name folders (a copied runs folder keeps its meaning)."""
        return os.path.relpath(Path(path).resolve(), self.runs_dir)

    @contextmanager
    def stage_run(
        self, stage: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> Iterator[str]:
        """A nested run for one stage; the environment points at it while the stage runs."""
        tags = {"dsv3.stage": stage, RUNS_DIR_TAG: self.runs_tag, **(tags or {})}
        if self.parent_id:
            tags[PARENT_TAG] = self.parent_id
        run = self.client.create_run(self.experiment_id, run_name=stage, tags=tags)
        run_id = run.info.run_id
        self.log_params(run_id, params)
        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
        os.environ.update(MLFLOW_TRACKING_URI=self.uri, MLFLOW_RUN_ID=run_id)
        # MLflow's fluent API keeps the first URI it was given for the whole process (transformers' callback
        # sets it only if unset), so a second store in the same process would look for this run in the first.
        mlflow.set_tracking_uri(self.uri)
        try:
            with self._terminated(run_id):
                yield run_id
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @contextmanager
    def _terminated(self, run_id: str) -> Iterator[None]:
        """FINISHED, or FAILED (KILLED for Ctrl-C, SIGTERM, a cancel from Prefect) if the body raised, with the
        reason in the run's description and tag dsv3.failure; when even that cannot be written (a full disk), the
        run stays RUNNING until `close_stale_runs` of the next pipeline run closes it."""
        try:
            yield
        except BaseException as error:
            if disk_full(error):
                raise  # nothing can be written now: the next run's close_stale_runs closes this one
            failure = classify(error)
            try:
                self.set_tags(run_id, {FAILURE_TAG: failure.message, NOTE_TAG: failure.message})
                self.client.set_terminated(run_id, status="KILLED" if failure.kind == "interrupted" else "FAILED")
            except Exception:  # noqa: BLE001 - the original error is what the user must see
                pass
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def close_stale_runs(self) -> int:
        """Mark KILLED the runs of this experiment and runs folder still RUNNING: their process died (killed, disk
        full) — the caller holds the runs folder's lock, so no live run can be among them."""
        stale = self._own(self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'"))
        for run in stale:
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return len(stale)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Every param, its value cut to MLflow's length limit, in batches of MLflow's size limit."""
        items = [Param(k, v) for k, v in sorted(param_values(params).items())]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start : start + 500])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def mark_reused(self, stage: str, run_id: str | None) -> None:
        """A skipped stage: tag the parent run with the run that produced the outputs and, when that run sits under
        another parent, nest a link run `<stage> (reused)` here (once): its description names the producing run,
        tag dsv3.reused_run holds its id, and it carries that run's metrics; no stage is logged twice."""
        if not self.parent_id:
            return
        self.set_tags(self.parent_id, {f"dsv3.reused.{stage}": run_id or "unknown"})
        if not run_id:
            return
        source = self.client.get_run(run_id)
        if source.data.tags.get(PARENT_TAG) == self.parent_id or self._linked(run_id):
            return
        tags = {
            PARENT_TAG: self.parent_id,
            REUSED_RUN_TAG: run_id,
            RUNS_DIR_TAG: self.runs_tag,
            NOTE_TAG: f"Reused: this stage did not run again; its outputs and metrics are those of run {source.info.run_name} "
            f"({self.run_url(run_id)}).",
        }
        link = self.client.create_run(self.experiment_id, run_name=f"{stage} (reused)", tags=tags).info.run_id
        self.log_metrics(link, source.data.metrics)
        self.client.set_terminated(link, status="FINISHED")

    def _linked(self, run_id: str) -> bool:
        """Whether the parent run already has a link run to `run_id`."""
        return bool(
            self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{REUSED_RUN_TAG}` = '{run_id}'",
            )
        )

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @contextmanager
    def system_metrics(self, run_id: str) -> Iterator[None]:
        """MLflow's system-metrics monitor (psutil; GPUs through pynvml where present) logging into the run."""
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def log_datasets(self, run_id: str, data: Mapping[str, Any]) -> None:
        """Each dataset (name -> an object with `rows`, `source`, `context`) as a run input: digest, source, schema
        and row count, as `mlflow.data` records them."""
        with warnings.catch_warnings():  # MLflow 3.17 warns about its own calls: a positional DataFrame.all in the
            # digest (pandas 3), and a file URI that both its "" and "file" local sources accept (the same class)
            warnings.filterwarnings("ignore", message="Starting with pandas version 4.0", module="mlflow")
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            inputs = [self._dataset_input(name, d) for name, d in data.items()]
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    @staticmethod
    def _dataset_input(name: str, data: Any) -> DatasetInput:
        return DatasetInput(
            mlflow.data.from_huggingface(data.rows, name=name, source=dataset_source(data.source))._to_mlflow_entity(),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, data.context)],
        )

    def register_model(
        self,
        run_id: str,
        name: str,
        folder: str | Path,
        tags: Mapping[str, str],
        description: str = "",
        model_description: str = "",
        model_tags: Mapping[str, str] | None = None,
    ) -> int:
        """A new version of registered model `name` (created on first use) from `folder`, linked to the run that
        wrote it, tagged and described (`description`: the version's, shown in its page and the versions table);
        returns the version. The registered model itself gets `model_description` and `model_tags` (the Tags
        column of the UI's model list), rewritten on every registration so a registry written by older code
        catches up. `models:/<name>/latest` is the newest (MLflow reserves the alias name `latest` for that)."""
        try:
            self.client.create_registered_model(name, tags=dict(model_tags or {}), description=model_description or None)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            if model_description:
                self.client.update_registered_model(name, description=model_description)
            for key, value in (model_tags or {}).items():
                self.client.set_registered_model_tag(name, key, value)
        version = self.client.create_model_version(
            name, source=Path(folder).resolve().as_uri(), run_id=run_id, tags=dict(tags), description=description or None
        )
        return version.version
