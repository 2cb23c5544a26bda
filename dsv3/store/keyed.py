"""One way to compute or reuse a keyed result: `key_of` names what decides it (settings and code), `reuse_or_compute`
reads it back when it was computed under that key and computes it otherwise.

The code a result is computed with (`code_files`): the module that computes it and the sibling modules it uses, file
by file; every other dsv3 subpackage it reaches, whole (so imports inside functions are covered). dsv3's top-level
modules (config, io, tracking, ...) and the store decide how a result is stored and shown, not what it is: editing
them reruns nothing. The runner keys stages with the same `code_hash` (dsv3.store.runner).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import dsv3
from dsv3.io import write_json_atomic

PLUMBING_DIRS = (Path(dsv3.__file__).parent.resolve(), Path(__file__).parent.resolve())  # dsv3/*.py, dsv3/store/


def code_files(module: ModuleType) -> list[Path]:
    """The source files `module` computes with (see the module docstring)."""
    home = Path(module.__file__).parent.resolve()
    used: dict[str, ModuleType] = {}
    pending = [module]
    while pending:
        current = pending.pop()
        if current.__name__ in used:
            continue
        used[current.__name__] = current
        if current is not module and (_plumbing(current) or hasattr(current, "__path__")):
            continue  # don't follow the plumbing, nor a package's attributes (they list all its submodules)
        for value in vars(current).values():
            other = (
                value
                if isinstance(value, ModuleType)
                else sys.modules.get(getattr(value, "__module__", None) or "")
            )
            if other is not None and other.__name__.split(".")[0] == "dsv3" and other.__name__ not in used:
                pending.append(other)
    files = set()
    for used_module in used.values():
        if used_module is not module and _plumbing(used_module):
            continue
        file = Path(used_module.__file__).resolve()
        files.update([file] if file.parent == home else file.parent.glob("*.py"))
    return sorted(files)


def _plumbing(module: ModuleType) -> bool:
    file = getattr(module, "__file__", None)
    return file is None or Path(file).resolve().parent in PLUMBING_DIRS


def code_hash(module: ModuleType) -> str:
    """sha256 over the source files `module` computes with (`code_files`)."""
    digest = hashlib.sha256()
    for file in code_files(module):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def key_of(settings: Any, code: ModuleType | None = None) -> str:
    """sha256 of `settings` (JSON: a dict of what decides the result) and of the code `code` computes with."""
    payload = json.dumps(settings, sort_keys=True) + (code_hash(code) if code is not None else "")
    return hashlib.sha256(payload.encode()).hexdigest()


def reuse_or_compute(path: str | Path, key: str, compute: Callable[[], dict], log: Callable[[str], Any] | None = None) -> dict:
    """The JSON result saved at `path` when it was computed under `key` (with "reused": True); else `compute()`,
    saved there with its key (written atomically, so a kill leaves the old result or none)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("key") == key:
        if log:
            log(f"reusing {path} (same key)")
        return saved | {"reused": True}
    result = {"key": key} | compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result
