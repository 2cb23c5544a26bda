"""A runs folder is portable: copied elsewhere, it opens with its own MLflow artifacts and plots, and a rerun there
reads and writes nothing of the original (which is deleted to prove it)."""

import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

from dsv3.cli import main
from dsv3.mlstore import relocate_store
from dsv3.tracking import tracking_uri
from flows.pipeline import pipeline
from tests.conftest import RECIPES

SMOKE = str(RECIPES / "smoke.yaml")
CHECKPOINT = ".ckpt"  # Lightning's own callback state in a checkpoint keeps absolute paths (see test docstring)


def files_naming(folder: Path, text: str) -> list[str]:
    """The files under `folder` (links not followed) whose bytes contain `text`, checkpoints aside."""
    return [
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.suffix != CHECKPOINT and text.encode() in p.read_bytes()
    ]


def test_a_copied_runs_folder_opens_and_reruns_without_the_original(tmp_path, capsys):
    """Lightning's ModelCheckpoint state inside *.ckpt still names the folder it was written in; a resume elsewhere
    reloads only best_model_path from it (Lightning's own rule for a changed dirpath), so it is not scanned here."""
    a, b = tmp_path / "a", tmp_path / "b"
    pipeline(recipe_path=SMOKE, until="pretrain", runs_dir=str(a))
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
    rerun = pipeline(recipe_path=SMOKE, until="pretrain", overrides=["checks.pretrain.max_val_loss_ratio=1.49"], runs_dir=str(b))
    assert [r["action"] for r in rerun] == ["skipped", "skipped"]
    assert not a.exists()
    assert files_naming(b, str(a)) == []
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "dsv3.stage" not in r.data.tags]
    assert len(parents) >= 2 and all(r.info.artifact_uri.startswith(b.as_uri() + "/") for r in parents)
    report = (b / "smoke" / "latest" / "report.md").read_text()
    assert "Run folder `smoke/" in report and str(b) not in report
    assert relocate_store(b) == 0  # opened once, the store is where it is


def test_relocate_store_without_a_store_does_nothing(tmp_path):
    assert relocate_store(tmp_path) == 0
