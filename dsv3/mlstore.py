"""The MLflow store inside a runs folder (`mlflow.db`, artifacts in `mlartifacts/`), and moving it with the folder.

MLflow keeps artifact locations as absolute URIs, so a copied or moved runs folder would show, and write, the
original's artifacts: `relocate_store` points them at where the folder is now. Imports neither MLflow nor torch, so
that `dsv3 runs` can call it and stay quick.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

ARTIFACTS = "mlartifacts"  # the artifact root inside the runs folder
STORE_DB = "mlflow.db"
RELOCATED = (  # MLflow's columns that hold URIs under the runs folder: moved with it by relocate_store
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
RELOCATED_IN_JSON = (("datasets", "dataset_source"),)  # JSON holding such URIs as strings ({"uri": "file:///..."})


def relocate_store(runs_dir: str | Path) -> int:
    """Point the MLflow store of a copied or moved runs folder at the folder where it is now: experiments' artifact
    locations, runs' artifact URIs, model versions' sources and run inputs' dataset sources (files the stages wrote,
    e.g. the reward stage's pairs) written under the folder it was in (their absolute URIs are how MLflow keeps
    them) are rewritten to this one. MLflow has no API to change them, so this
    updates its tables (sqlite) in one transaction. Returns how many experiments moved; 0 without a store there."""
    database = Path(runs_dir).resolve() / STORE_DB
    if not database.is_file():
        return 0
    here = (database.parent / ARTIFACTS).as_uri()
    with closing(sqlite3.connect(database)) as db, db:
        roots = [row[0] for row in db.execute("SELECT artifact_location FROM experiments")]
        moved = {loc.removesuffix(ARTIFACTS) for loc in roots if loc.endswith("/" + ARTIFACTS) and loc != here}
        new = here.removesuffix(ARTIFACTS)
        for old in moved:
            for table, column in RELOCATED:
                db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, len(old), old),
                )
            for table, column in RELOCATED_IN_JSON:
                db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (f'"{old}', f'"{new}'))
    return len(moved)
