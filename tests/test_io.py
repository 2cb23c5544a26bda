"""dsv3/io.py: atomic writes leave the old version (or nothing) when writing fails part-way."""

import json

import pytest

from dsv3.io import atomic_dir, write_json_atomic, write_text_atomic


def test_text_and_json_replace_whole(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "one")
    write_json_atomic(path, {"two": 2})
    assert json.loads(path.read_text()) == {"two": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


def test_a_failed_write_keeps_the_previous_version(tmp_path):
    path = write_text_atomic(tmp_path / "a.json", '{"ok": true}')
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}


def test_atomic_dir(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as partial:
        (partial / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as partial:
            (partial / "weights").write_text("v2 half")
            raise RuntimeError("killed mid-save")
    assert (out / "weights").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
