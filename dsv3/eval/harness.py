"""`dsv3 eval MODEL`: lm-evaluation-harness (`lm_eval.simple_evaluate`, its `hf` model) on a model folder with the
project's own tasks (lm_eval_tasks/, datasets from dsv3.eval.lm_tasks), offline.

A stage's model folder (model_type dsv3) is exported to a temporary deepseek_v3 folder first (dsv3.model.hf); an
export-hf folder is read as it is. The results go to `lm_eval.json` in the stage folder (beside stage.json; in the
folder itself for an export) and, when the stage's manifest names an MLflow run, to that run as metrics
`lm_eval/<task>/<metric>` and the JSON as an artifact.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dsv3.config import Recipe
from dsv3.io import write_json_atomic
from dsv3.model.hf import read_config_json

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = tuple(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
RESULTS_NAME = "lm_eval.json"
MAX_GEN_TOKS = 160  # a worked solution of the tiny recipe's problems is ~60-120 tokens
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The task names, each one of TASKS; a one-line ValueError otherwise."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task {', '.join(unknown) or '(none given)'}: choose from {', '.join(TASKS)}")
    return list(tasks)


def task_metadata(recipe: Recipe) -> dict:
    """What the task builders read (dsv3.eval.lm_tasks): the recipe's corpus, and the difficulty of its SFT
    problems (the section's defaults when the recipe has no sft section) with the recipe seed."""
    from dsv3.config import SftSection

    sft = recipe.sft or SftSection()
    problems = {"n": sft.heldout_problems, "steps": sft.problem_steps, "max_operand": sft.max_operand,
                "kinds": list(sft.problem_kinds), "seed": recipe.seed}  # fmt: skip
    return {"data": recipe.data.model_dump(mode="json"), "problems": problems}


@contextmanager
def hf_folder(model: Path) -> Iterator[Path]:
    """A deepseek_v3 folder of `model`: itself when it is one, else its export in a temporary folder."""
    model_type = read_config_json(model).get("model_type")
    if model_type == "deepseek_v3":
        yield model
    elif model_type == "dsv3":
        from dsv3.model.hf import export_hf

        with tempfile.TemporaryDirectory(prefix="dsv3-eval-") as tmp:
            yield export_hf(model, Path(tmp) / "hf")
    else:
        raise ValueError(f"{model} holds model_type {model_type!r}: pass a stage's model folder or an export-hf folder")


def results_path(model: Path) -> Path:
    """lm_eval.json in the stage folder when `model` is a stage's model/, else in `model` itself."""
    return model.parent / RESULTS_NAME if (model.parent / "stage.json").is_file() else model / RESULTS_NAME


def run_lm_eval(
    model: str | Path, recipe: Recipe, tasks: Sequence[str] = TASKS, limit: int | None = None,
    batch_size: int = 8, device: str = "cpu",
) -> dict:  # fmt: skip
    """lm-eval's results dict of `tasks` on `model` (limit: first N examples of each task), nothing downloaded."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tasks = Path(model), check_tasks(tasks)
    os.environ.update(OFFLINE)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=task_metadata(recipe))
    context = read_config_json(model).get("max_position_embeddings", 2 * MAX_GEN_TOKS)
    with hf_folder(model) as folder:
        return lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(folder), "dtype": "float32"},
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=False,
            bootstrap_iters=1000,
            gen_kwargs={"max_gen_toks": min(MAX_GEN_TOKS, context // 2)},  # the prompt needs the rest
        )


def metrics(results: dict) -> dict[str, float]:
    """{"lm_eval/<task>/<metric>": value} of every numeric metric (stderrs included), filter names dropped."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if isinstance(value, int | float) and "," in key:
                out[f"lm_eval/{task}/{key.split(',')[0]}"] = float(value)
    return out


def summary(results: dict, model: Path, recipe: Recipe, limit: int | None) -> dict:
    """What lm_eval.json holds: the metrics per task, examples scored, and what was evaluated with what."""
    from lm_eval import __version__ as lm_eval_version

    return {
        "model": str(model.resolve()),
        "recipe": recipe.name,
        "limit": limit,
        "lm_eval_version": lm_eval_version,
        "results": {task: {k.split(",")[0]: v for k, v in values.items() if "," in k}
                    for task, values in results["results"].items()},  # fmt: skip
        "samples": {task: n["effective"] for task, n in results["n-samples"].items()},
    }


def log_to_stage_run(model: Path, path: Path, values: dict[str, float]) -> str | None:
    """Log the metrics and the JSON to the MLflow run named by the stage's manifest; its id, or None when there is
    none (an export folder, or a store without that run)."""
    from dsv3.store.manifest import read_manifest

    manifest = read_manifest(model.parent)
    if manifest is None or not manifest.mlflow_run_id:
        return None
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dsv3.tracking import tracking_uri

    runs_dir = model.parent.resolve().parents[2]  # runs/stages/<stage>/<id>
    client = MlflowClient(tracking_uri=tracking_uri(runs_dir))
    try:
        client.get_run(manifest.mlflow_run_id)
    except MlflowException:
        return None
    now = int(time.time() * 1000)
    client.log_batch(manifest.mlflow_run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(values.items())])
    client.log_artifact(manifest.mlflow_run_id, str(path))
    return manifest.mlflow_run_id


def evaluate(model: str | Path, recipe: Recipe, tasks: Sequence[str] = TASKS, limit: int | None = None,
             batch_size: int = 8, device: str = "cpu") -> tuple[dict, Path, str | None]:  # fmt: skip
    """Run the tasks, write lm_eval.json, log to the stage's MLflow run: (lm-eval's results, the JSON's path, the
    run id logged to or None)."""
    model = Path(model)
    results = run_lm_eval(model, recipe, tasks, limit, batch_size, device)
    path = results_path(model)
    write_json_atomic(path, summary(results, model, recipe, limit), indent=2)
    run_id = log_to_stage_run(model, path, metrics(results))
    return results, path, run_id


def read_results(stage_dir: Path) -> dict | None:
    """A stage folder's lm_eval.json, or None when it has none or it is unreadable."""
    try:
        return json.loads((Path(stage_dir) / RESULTS_NAME).read_text())
    except (OSError, ValueError):
        return None
