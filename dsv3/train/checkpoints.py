"""The loop's checkpoints: written atomically, the one before kept, an unreadable one set aside (never deleted).

`checkpoints/last.ckpt` is written every checkpoint_every_n_steps through a temporary file and a rename, so a kill
never leaves half a checkpoint; the last.ckpt it replaces becomes previous.ckpt. A rerun resumes from the newest
of the two that loads with weights_only=True (no pickled code is ever run); one that does not is renamed
`<name>.corrupt-<time>` and the run says so.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

LAST, PREVIOUS = "last.ckpt", "previous.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed; the last.ckpt being replaced becomes previous.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        partial = Path(f"{path}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        if path.name == LAST and path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(partial, path)


def resume_point(checkpoints: Path) -> tuple[Path | None, int]:
    """(the newest readable of last.ckpt / previous.ckpt, its optimizer step), or (None, 0) when there is none.
    An unreadable one (truncated, tampered: it is loaded with weights_only=True) is set aside, and said so."""
    for name in (LAST, PREVIOUS):
        path = Path(checkpoints) / name
        if not path.is_file():
            continue
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is set aside the same way
            aside = path.with_name(f"{name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            print(f"dsv3: checkpoint {path} is unreadable ({reason}); set aside as {aside.name}", file=sys.stderr)
            continue
        return path, step
    return None, 0
