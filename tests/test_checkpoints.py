"""dsv3/train/checkpoints.py: a checkpoint's ModelCheckpoint state names no absolute path, and one read in another
folder (a moved runs folder) keeps its best score and points at the files where they are now."""

import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dsv3.train.checkpoints import PortableModelCheckpoint


def best_callback(folder: Path) -> PortableModelCheckpoint:
    return PortableModelCheckpoint(dirpath=folder, filename="best", monitor="val/loss", mode="min", save_top_k=1)


def trained(callback: PortableModelCheckpoint, folder: Path) -> PortableModelCheckpoint:
    """As after a validation that saved best.ckpt (val/loss 2.5) and a last.ckpt."""
    callback.best_model_score = callback.kth_value = torch.tensor(2.5)
    callback.best_model_path = callback.kth_best_model_path = str(folder / "best.ckpt")
    callback.best_k_models = {str(folder / "best.ckpt"): torch.tensor(2.5)}
    callback.last_model_path = str(folder / "last.ckpt")
    return callback


def test_the_saved_state_is_relative_and_reads_back_in_another_folder(tmp_path):
    a, b = (tmp_path / "a").resolve(), (tmp_path / "b").resolve()
    state = trained(best_callback(a), a).state_dict()
    assert str(tmp_path) not in repr(state)
    assert state["dirpath"] == "." and state["best_model_path"] == "best.ckpt" and list(state["best_k_models"]) == ["best.ckpt"]

    moved = best_callback(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "The dirpath has changed" would drop the best score
        moved.load_state_dict(state)
    assert moved.best_model_score == 2.5 and moved.kth_value == 2.5
    assert moved.best_model_path == moved.kth_best_model_path == str(b / "best.ckpt")
    assert list(moved.best_k_models) == [str(b / "best.ckpt")] and moved.last_model_path == str(b / "last.ckpt")


def test_an_older_absolute_state_is_moved_too_and_found_under_modelcheckpoints_key(tmp_path):
    a, b = (tmp_path / "a").resolve(), (tmp_path / "b").resolve()
    old = trained(best_callback(a), a)
    legacy = ModelCheckpoint.state_dict(old)  # as Lightning's own callback wrote it, before this one
    assert legacy["dirpath"] == str(a)
    moved = best_callback(b)
    assert moved.state_key == ModelCheckpoint(monitor="val/loss", mode="min").state_key
    moved.load_state_dict(legacy)
    assert moved.best_model_score == 2.5 and moved.best_model_path == str(b / "best.ckpt")
    assert list(moved.best_k_models) == [str(b / "best.ckpt")]

    same = best_callback(a)  # read where it was written: as Lightning reads it
    same.load_state_dict(legacy)
    assert same.best_model_path == str(a / "best.ckpt") and same.best_model_score == 2.5
