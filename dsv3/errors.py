"""How a run can go wrong, and what the command line makes of it (docs/design.md, "Contracts").

- bad input (recipe, data, checkpoint, runs folder): a ValueError (RecipeError, InputError, ...) whose first line
  names the file or key and what to do: exit code 2, no traceback;
- a stage that ran but failed its own checks or diverged: StageFailed, one line with the check and its value: 1;
- a full disk: one line naming the folder: 1 (rerun after freeing space resumes);
- Ctrl-C or SIGTERM: "interrupted — rerun to resume": 130 (143 for SIGTERM).
Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
DISK_FULL_SIGNS = ("No space left on device", "database or disk is full", "Disk quota exceeded", "file write failed")


class InputError(ValueError):
    """Bad input the user can mend; the message is one line naming what is wrong and how to mend it."""


class StageFailed(RuntimeError):
    """A stage ran but its result is not sound (a failed health check, a diverged loss); one line."""


class TrainingDiverged(StageFailed):
    """A non-finite loss, gradient norm or learning rate stopped training (the last good checkpoint is kept)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every `finally` runs (servers stopped, manifests written)."""

    signal_exit = 143


@dataclass(frozen=True)
class Failure:
    """What ended a stage or a run: kind (input | check | diverged | disk | interrupted | crash) and one line."""

    kind: str
    message: str

    @property
    def exit_code(self) -> int:
        return {"input": EXIT_BAD_INPUT, "interrupted": EXIT_INTERRUPTED}.get(self.kind, EXIT_FAILED)


def disk_full(error: BaseException) -> bool:
    """True when `error`, or an exception it was raised from, says the disk (or the sqlite store on it) is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(sign in str(error) for sign in DISK_FULL_SIGNS):
            return True
        error = error.__cause__ or error.__context__
    return False


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def classify(error: BaseException, folder: Path | str | None = None) -> Failure:
    """The Failure an exception stands for; `folder` is where the stage was writing (named for a full disk)."""
    if isinstance(error, KeyboardInterrupt) or type(error).__name__ == "TerminationSignal":  # Prefect's SIGTERM
        return Failure("interrupted", "interrupted — rerun the same command to resume")
    if disk_full(error):
        where = getattr(error, "filename", None) or folder or "the runs folder"
        return Failure("disk", f"disk full while writing {where}: free space there and rerun the same command to resume")
    if isinstance(error, TrainingDiverged):
        return Failure("diverged", first_line(error))
    if isinstance(error, StageFailed):
        return Failure("check", first_line(error))
    if isinstance(error, ValueError | FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        return Failure("input", first_line(error))
    return Failure("crash", f"{type(error).__name__}: {first_line(error)}")
