"""The content of the local files a stage reads, as one hash for its key (an edited corpus reruns what reads it).

Hashing a large corpus on every run would cost minutes, so each file's sha256 is kept in a cache beside the runs
(`runs/.fingerprints.json`) under its path, size, modification time and inode, and recomputed only when one of
those changes. A file rewritten with the same size within the same mtime tick would be missed; that is the usual
trade-off (make, rsync) and the reason mtime is kept in nanoseconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from dsv3.io import write_text_atomic

CACHE_NAME = ".fingerprints.json"


def files_under(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and every file inside the folders named, sorted; missing paths are left to the stage."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            found.update(p.resolve() for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.add(path.resolve())
    return sorted(found)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(paths: Iterable[str | Path], cache_dir: Path) -> str:
    """One sha256 over (path, content hash) of every file under `paths`; "" when there are none."""
    files = files_under(paths)
    if not files:
        return ""
    cache_file = Path(cache_dir) / CACHE_NAME
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digest, changed = hashlib.sha256(), False
    for file in files:
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = cache.get(str(file))
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry, changed = {"stamp": stamp, "sha256": file_sha256(file)}, True
            cache[str(file)] = entry
        digest.update(f"{file}\0{entry['sha256']}\n".encode())
    if changed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_file, json.dumps(cache))
    return digest.hexdigest()
