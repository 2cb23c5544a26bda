"""One pipeline run per runs folder at a time (docs/design.md, "Contracts").

The runs folder holds the MLflow store, Prefect's database and every stage folder; two runs writing it at once
race on database set-up or train the same stage folder twice. `runs_lock` takes an exclusive flock on
`<runs>/.lock` for the whole run and writes who holds it there; a second run is refused with one line naming the
holder. The kernel drops a flock when its process dies, so a lock left by a killed run is recovered at once (the
holder line it left is stale and overwritten). flock is per machine: runs folders shared over NFS between nodes
are not protected.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsv3.errors import InputError

LOCK_NAME = ".lock"


_HELD: dict[Path, int] = {}  # lock files this process holds, and how many contexts hold each (re-entrant)


@contextmanager
def runs_lock(runs_dir: Path, command: str) -> Iterator[None]:
    """Hold `<runs_dir>/.lock` exclusively while the context is open; InputError if another run holds it. Nested
    use in one process (`dsv3 run` takes it, then the flow it starts) holds it once."""
    path = (Path(runs_dir) / LOCK_NAME).resolve()
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{runs_dir} is in use by {holder(path)}: wait for it to finish or pass another --runs-dir") from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.time()}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the flock


def holder(path: Path) -> str:
    """"pid 123 on host (dsv3 run ..., since 12:00:00)" from the lock file, or a plain description."""
    try:
        info = json.loads(Path(path).read_text())
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another dsv3 run"
