"""A runs folder is portable: copied elsewhere, it opens with its own MLflow artifacts and plots, a rerun there
reads and writes nothing of the original (which is deleted to prove it), no file in it names the original, its
checkpoints included, and a stage stopped part-way resumes from its checkpoint after the move."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dsv3.cli import main
from dsv3.config import load_recipe
from dsv3.mlstore import relocate_store
from dsv3.stages import run_stage
from dsv3.store.runs import run_root
from dsv3.tracking import tracking_uri
from flows.pipeline import pipeline
from tests.conftest import RECIPES

SMOKE = str(RECIPES / "smoke.yaml")


def files_naming(folder: Path, text: str) -> list[str]:
    """The files under `folder` (links not followed) whose bytes contain `text`, checkpoints (uncompressed zips of
    pickles: paths in them are plain bytes) included."""
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()
    ]


def test_a_copied_runs_folder_opens_and_reruns_without_the_original(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    pipeline(recipe_path=SMOKE, runs_dir=str(a))  # every stage: Lightning's and the Trainer's checkpoints
    shutil.copytree(a, b, symlinks=True)
    shutil.rmtree(a)  # any read from the original now fails, any write would bring it back

    assert main(["runs", "--runs-dir", str(b)]) in (None, 0)
    assert str(a) not in capsys.readouterr().out
    client = MlflowClient(tracking_uri(b))
    experiment = client.get_experiment_by_name("dsv3-smoke")
    assert experiment.artifact_location == (b / "mlartifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id])
    assert runs and all(r.info.artifact_uri.startswith(b.as_uri() + "/") for r in runs)
    assert {r.data.tags["dsv3.runs_dir"] for r in runs} == {"."}
    (pretrain,) = [r for r in runs if r.data.tags.get("dsv3.stage") == "pretrain"]
    assert not Path(pretrain.data.tags["dsv3.output_dir"]).is_absolute()
    plot = client.download_artifacts(pretrain.info.run_id, "plots/loss_curves.png", str(tmp_path / "downloaded"))
    assert Path(plot).read_bytes() == (b / pretrain.data.tags["dsv3.output_dir"] / "loss_curves.png").read_bytes()
    (version,) = client.search_model_versions("name = 'dsv3-smoke-pretrain'")
    assert version.source.startswith(b.as_uri() + "/") and not Path(version.tags["dsv3.run_folder"]).is_absolute()

    # a stricter check re-judges the copied stages in a variant of their own; the report is written in the copy
    rerun = pipeline(recipe_path=SMOKE, overrides=["checks.pretrain.max_val_loss_ratio=1.49"], runs_dir=str(b))
    assert [r["action"] for r in rerun] == ["skipped"] * 6
    assert not a.exists()
    assert files_naming(b, str(a)) == []
    assert list(b.rglob("*.ckpt")) and list(b.rglob("checkpoint-*/trainer_state.json"))  # the scan saw checkpoints
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "dsv3.stage" not in r.data.tags]
    assert len(parents) >= 2 and all(r.info.artifact_uri.startswith(b.as_uri() + "/") for r in parents)
    report = (b / "smoke" / "latest" / "report.md").read_text()
    assert "Run folder `smoke/" in report and str(b) not in report
    assert relocate_store(b) == 0  # opened once, the store is where it is


@pytest.mark.slow
def test_a_stage_stopped_part_way_resumes_after_its_runs_folder_moved(tmp_path, monkeypatch):
    """Pretraining stopped at step 11 (NaN learning rate; last.ckpt of step 8 holds the best-checkpoint state of the
    step-4 validation), the runs folder moved, the stage rerun there: it resumes from step 8 with the best score it
    had, Lightning never warns that the checkpoint folder changed, and nothing names or recreates the old folder."""
    import dsv3.train.module as module
    from dsv3.errors import TrainingDiverged
    from dsv3.train.checkpoints import PortableModelCheckpoint

    a, b = tmp_path / "a", tmp_path / "b"
    recipe = load_recipe(SMOKE, ["pretrain.val_every_n_steps=4"])
    run_stage("tokenizer", recipe, a)
    real = module.learning_rate
    monkeypatch.setattr(module, "learning_rate", lambda tokens, total, s: float("nan") if tokens >= 10 * 8 * 64 else real(tokens, total, s))
    with pytest.raises(TrainingDiverged, match="at step 11"):
        run_stage("pretrain", recipe, a)
    monkeypatch.setattr(module, "learning_rate", real)
    shutil.move(a, b)

    checkpoints = run_root(b, recipe) / "pretrain" / "checkpoints"
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 8 and files_naming(b, str(a)) == []
    best = PortableModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1)
    best.load_state_dict(state["callbacks"][best.state_key])
    assert best.best_model_score is not None and Path(best.best_model_path) == checkpoints.resolve() / "best.ckpt"
    assert Path(best.best_model_path).is_file()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_stage("pretrain", recipe, b)
    assert resumed.action == "resumed" and resumed.manifest.metrics["resumed_from_step"] == 8
    assert resumed.manifest.status == "completed"
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert not a.exists() and files_naming(b, str(a)) == []


def test_relocate_store_without_a_store_does_nothing(tmp_path):
    assert relocate_store(tmp_path) == 0
