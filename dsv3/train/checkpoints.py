"""The loop's checkpoints: written atomically, the one before kept, an unreadable one set aside (never deleted).

`checkpoints/last.ckpt` is written every checkpoint_every_n_steps through a temporary name and a rename, so a kill
never leaves half a checkpoint; the last.ckpt it replaces becomes previous.ckpt. A one-process run writes one file,
an FSDP2 run a sharded folder (dsv3.train.sharded); either resumes the other. A rerun resumes from the newest of the
two that reads back without running pickled code; one that does not is renamed `<name>.corrupt-<time>` and the run
says so. A checkpoint names no absolute path (PortableModelCheckpoint): a moved runs folder resumes with its best
checkpoint's score and files where they are now.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from dsv3.io import set_aside
from dsv3.train.sharded import is_sharded, sharded_step, unsharded

LAST, PREVIOUS = "last.ckpt", "previous.ckpt"
MICRO_BATCHES_PER_STEP = "dsv3_micro_batches_per_step"  # the checkpoint's gradient-accumulation steps


def put_in_place(written: Path, path: Path) -> None:
    """Move a fully written checkpoint (file or folder) to `path`; a last.ckpt it replaces becomes previous.ckpt."""
    if path.exists():
        if path.name == LAST:
            previous = path.with_name(PREVIOUS)
            remove(previous)
            os.replace(path, previous)
        else:
            remove(path)
    os.replace(written, path)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def rescale_batch_counts(fit_loop: dict[str, Any], step: int, saved: int, current: int) -> None:
    """In place: Lightning's training batch counters (micro-batches since the epoch began) of a checkpoint written at
    optimizer step `step` with `saved` micro-batches per step, moved to `current` per step — what a run on another
    world size takes for the same global batch. Steps and the data position are counted in steps already; these
    counters decide when validation runs."""
    if saved == current:
        return
    shift = step * (current - saved)
    progress = fit_loop["epoch_loop.batch_progress"]
    for counters in (progress["total"], progress["current"]):
        for name in counters:
            counters[name] += shift
    fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] += shift


class AtomicCheckpointIO(TorchCheckpointIO):
    """One-file checkpoints written under a temporary name and put in place; a sharded folder (an FSDP2 run's) is
    read back whole, as a one-process run resumes from it."""

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded(Path(path)):
            return unsharded(Path(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        partial = Path(f"{path}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        put_in_place(partial, path)


class PortableModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose state, saved in every checkpoint, names its files relative to its folder
    (`dirpath` ".", `best.ckpt`, ...) rather than by absolute paths: a runs folder copied or moved elsewhere resumes
    with its best score, best and last files where they are now, and never reads or deletes the original's. (Lightning
    keeps absolute paths and, when the folder differs, drops everything but best_model_path, so the first
    validation after a move would overwrite best.ckpt whatever its loss.) Loads the absolute state of checkpoints
    written before, moved as well; its state key is ModelCheckpoint's, so that they find it."""

    PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        here = Path(self.dirpath) if self.dirpath else None

        def relative(path: str) -> str:
            return str(Path(path).relative_to(here)) if path and here and Path(path).is_relative_to(here) else path

        state["dirpath"] = "." if here else state["dirpath"]
        state.update({key: relative(state[key]) for key in self.PATHS})
        state["best_k_models"] = {relative(path): score for path, score in state["best_k_models"].items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath:
            written_in = None if saved == "." else Path(saved)  # "." (relative) or where an older one was written

            def here(path: str) -> str:
                if not path:
                    return path
                if written_in is not None and Path(path).is_relative_to(written_in):
                    path = str(Path(path).relative_to(written_in))
                return str(Path(self.dirpath) / path) if not Path(path).is_absolute() else path

            state_dict = dict(state_dict, dirpath=self.dirpath)
            state_dict.update({key: here(state_dict[key]) for key in self.PATHS if key in state_dict})
            state_dict["best_k_models"] = {here(path): v for path, v in state_dict.get("best_k_models", {}).items()}
        super().load_state_dict(state_dict)


def resume_point(checkpoints: Path) -> tuple[Path | None, int]:
    """(the newest readable of last.ckpt / previous.ckpt, its optimizer step), or (None, 0) when there is none.
    An unreadable one (truncated, tampered: it is loaded with weights_only=True) is set aside, and said so."""
    for name in (LAST, PREVIOUS):
        path = Path(checkpoints) / name
        if not path.exists():
            continue
        try:
            step = (
                sharded_step(path)
                if path.is_dir()
                else int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
            )
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside the same way
            set_aside(path, str(err).splitlines()[0][:120] if str(err) else type(err).__name__)
            continue
        return path, step
    return None, 0

