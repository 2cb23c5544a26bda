"""The stage manifest `stage.json`: what a stage was asked to do, what it produced, and whether to trust it.

A manifest is trusted (and its stage skipped) only when its status is `completed`, its key — the hash of the
stage's recipe sections, the hashes of its inputs and the hash of the stage's code — equals the key of the
current request, and every output it lists still exists with the sha256 it had when the stage finished.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsv3.io import write_json_atomic

MANIFEST_NAME = "stage.json"
Status = Literal["running", "completed", "failed"]


@dataclass(frozen=True)
class StageKey:
    """What identifies one request for a stage: equal keys mean equal outputs."""

    recipe_hash: str
    input_hashes: dict[str, str]
    code_hash: str
    data_hash: str = ""  # content of the local files the stage reads (dsv3.store.fingerprint)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class Manifest:
    stage: str
    status: Status
    key: StageKey
    code_version: str
    outputs: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # plots etc., relative to the stage folder
    mlflow_run_id: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 1
    checks: list[dict] = field(default_factory=list)  # dsv3.store.health.Check.to_json() of each judged check
    failure: dict | None = None  # {"kind", "message"} of what stopped a failed stage (dsv3.errors.Failure)
    fixed_hash: str = ""  # key without the sections a diverged run may change and still resume (Stage.tunable)

    @property
    def failed_checks(self) -> list[dict]:
        return [c for c in self.checks if not c["passed"]]

    @property
    def output_hash(self) -> str:
        """One hash over all outputs: the input hash of the stages downstream."""
        return hashlib.sha256(json.dumps(self.outputs, sort_keys=True).encode()).hexdigest()

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_hash"] = self.output_hash
        data["duration_s"] = self.duration_s
        return data


def read_manifest(workdir: Path) -> Manifest | None:
    """The manifest in `workdir`, or None when it is absent or unreadable (a corrupt manifest is not trusted)."""
    path = Path(workdir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        data.pop("output_hash", None)
        data.pop("duration_s", None)
        data["key"] = StageKey(**data["key"])
        data.pop("failed_checks", None)
        return Manifest(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_manifest(workdir: Path, manifest: Manifest) -> Path:
    """Write atomically (temporary file + rename), so a kill never leaves half a manifest."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(workdir / MANIFEST_NAME, manifest.to_json(), indent=2, sort_keys=True)


def hash_outputs(workdir: Path, outputs: list[str]) -> dict[str, str]:
    """sha256 of each output (a file, or a folder hashed over its sorted relative paths and contents)."""
    hashes = {}
    for rel in outputs:
        path = Path(workdir) / rel
        if not path.exists():
            raise FileNotFoundError(f"stage output {rel!r} was not written under {workdir}")
        hashes[rel] = sha256_path(path)
    return hashes


def sha256_path(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def outputs_intact(manifest: Manifest, workdir: Path) -> bool:
    """Every output the manifest lists is still there with its recorded hash."""
    try:
        return hash_outputs(workdir, list(manifest.outputs)) == manifest.outputs
    except FileNotFoundError:
        return False


def is_trusted(manifest: Manifest | None, key: StageKey, workdir: Path) -> bool:
    """Completed, same key, and every output still there with its recorded hash."""
    if manifest is None or manifest.status != "completed" or manifest.key != key:
        return False
    return outputs_intact(manifest, workdir)
