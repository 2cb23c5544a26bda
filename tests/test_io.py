"""dsv3/io.py: atomic writes leave the old version (or nothing) when writing fails part-way; an unreadable checkpoint is
renamed aside, never deleted."""

import json

import pytest

from dsv3.io import atomic_dir, set_aside, write_json_atomic, write_text_atomic


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


def test_set_aside_renames_keeps_the_bytes_and_says_so(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_st')
    aside = set_aside(checkpoint, "truncated")
    assert not checkpoint.exists() and aside.parent == tmp_path and aside.name.startswith("checkpoint-8.corrupt-")
    assert (aside / "trainer_state.json").read_text() == '{"global_st'
    assert f"dsv3: checkpoint {checkpoint} is unreadable (truncated); set aside as {aside.name}" in capsys.readouterr().err
    assert set_aside(checkpoint, "truncated") is None  # another rank set it aside first
