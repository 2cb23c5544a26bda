"""Atomic writes: a file or folder appears whole under its name or not at all (a kill, a crash or a full disk
mid-write leaves the previous version, or nothing, never half a file). Write to a sibling, then rename.

A checkpoint that does not read back is renamed aside, never deleted (set_aside): its bytes stay for a post-mortem."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to a sibling temporary file, fsync it and rename it over `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, payload, **options) -> Path:
    """`payload` as JSON, atomically (json.dumps keyword options pass through)."""
    return write_text_atomic(path, json.dumps(payload, **options))


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a sibling folder `<out>.partial` to fill; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def set_aside(path: str | Path, problem: str) -> Path | None:
    """Rename the unreadable checkpoint `path` (file or folder) to `<name>.corrupt-<time>` and say so on stderr with
    `problem`; the new path, or None when it is gone already (another rank of the run set it aside first)."""
    path = Path(path)
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return None
    print(f"dsv3: checkpoint {path} is unreadable ({problem}); set aside as {aside.name}", file=sys.stderr)
    return aside
