"""dsv3/store/keyed.py: a keyed result is computed once and read back under the same key; another key, or an
unreadable file, computes it again; the code a result is keyed on."""

from dsv3.store.keyed import code_files, key_of, reuse_or_compute


def test_a_result_is_reused_under_its_key_and_recomputed_under_another(tmp_path):
    path, calls = tmp_path / "result.json", []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    first = reuse_or_compute(path, key_of({"lr": 1e-3}), compute)
    assert first["value"] == 1 and "reused" not in first
    again = reuse_or_compute(path, key_of({"lr": 1e-3}), compute)
    assert again["value"] == 1 and again["reused"] and len(calls) == 1
    other = reuse_or_compute(path, key_of({"lr": 3e-3}), compute)
    assert other["value"] == 2 and len(calls) == 2
    path.write_text("{not json")
    assert reuse_or_compute(path, key_of({"lr": 3e-3}), compute)["value"] == 3


def test_the_code_of_a_probe_is_its_module_and_the_library_it_uses():
    import dsv3.probes.copy as copy

    names = {f"{p.parent.name}/{p.name}" for p in code_files(copy)}
    assert {"probes/copy.py", "model/moe.py", "train/fit.py", "eval/induction.py"} <= names
    assert "probes/grpo.py" not in names  # a sibling it does not use
    assert not any(n.startswith(("store/", "dsv3/")) for n in names)  # the store and top-level modules: plumbing
