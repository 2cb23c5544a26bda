"""dsv3/errors.py: which failure an exception stands for, and the exit code it ends with."""

import errno
import sqlite3

from dsv3.config import RecipeError
from dsv3.errors import Interrupted, StageFailed, TrainingDiverged, classify, disk_full


def test_kinds_and_exit_codes():
    cases = [
        (RecipeError("model.hidden_size: bad"), "input", 2),
        (FileNotFoundError("no such file"), "input", 2),
        (StageFailed("stage sft failed its health check ..."), "check", 1),
        (TrainingDiverged("training diverged at step 3"), "diverged", 1),
        (KeyboardInterrupt(), "interrupted", 130),
        (Interrupted(), "interrupted", 130),
        (RuntimeError("boom"), "crash", 1),
    ]
    for error, kind, code in cases:
        failure = classify(error)
        assert (failure.kind, failure.exit_code) == (kind, code), error
    assert classify(ValueError("first line\nsecond")).message == "first line"


def test_a_full_disk_is_recognised_through_wrapping_and_names_the_folder():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("MLflow could not log") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    failure = classify(OSError(errno.ENOSPC, "No space left on device"), "/runs/tiny/pretrain")
    assert failure.kind == "disk" and "/runs/tiny/pretrain" in failure.message and "rerun" in failure.message
