"""dsv3/store/runs.py and `dsv3 runs` / `dsv3 compare`: variants of a recipe keep their own folders, share the
stage folders they agree on (linked, not copied), `latest` follows the newest, and two runs compare side by side."""

import json

import pytest

from dsv3.cli import main
from dsv3.config import load_recipe, without_hardware
from dsv3.errors import InputError
from dsv3.stages import run_stage
from dsv3.store.runs import (
    LATEST,
    list_runs,
    recipe_differences,
    record_run,
    resolve_run,
    run_root,
    variant_name,
    view,
)
from tests.conftest import RECIPES

SMOKE = RECIPES / "smoke.yaml"


def test_variant_names_come_from_the_overrides_and_the_resolved_recipe():
    base = load_recipe(SMOKE)
    assert variant_name(base).startswith("base-") and len(variant_name(base)) == len("base-") + 6
    assert variant_name(load_recipe(SMOKE)) == variant_name(base)  # the same recipe, the same folder
    tuned = load_recipe(SMOKE, ["pretrain.lr_peak=1e-3"])
    assert variant_name(tuned).startswith("lr_peak=1e-3-") and variant_name(tuned) != variant_name(base)
    assert variant_name(load_recipe(SMOKE, [], variant="mine")) == "mine"
    assert variant_name(load_recipe(SMOKE, ["seed=0"])).endswith(variant_name(base)[-6:])  # same resolved recipe


def test_two_variants_share_the_stage_they_agree_on_and_keep_the_rest(runs_dir, capsys):
    base, tuned = load_recipe(SMOKE), load_recipe(SMOKE, ["tokenizer.vocab_size=600"])
    for recipe in (base, tuned):
        record_run(runs_dir, recipe, SMOKE)
        run_stage("tokenizer", recipe, runs_dir)
    a, b = run_root(runs_dir, base), run_root(runs_dir, tuned)
    assert a != b and (a / "tokenizer").is_symlink() and (b / "tokenizer").is_symlink()
    assert (a / "tokenizer").resolve() != (b / "tokenizer").resolve()  # different keys: both kept
    again = load_recipe(SMOKE, [], variant="again")
    record_run(runs_dir, again, SMOKE)
    assert run_stage("tokenizer", again, runs_dir).action == "skipped"
    assert (run_root(runs_dir, again) / "tokenizer").resolve() == (a / "tokenizer").resolve()  # linked, not copied
    assert (runs_dir / "smoke" / LATEST).resolve() == run_root(runs_dir, again)

    assert [r.label for r in list_runs(runs_dir)] == [f"smoke/{n}" for n in ("again", b.name, a.name)]
    assert resolve_run("smoke", runs_dir) == run_root(runs_dir, again)
    assert resolve_run(f"smoke/{b.name}", runs_dir) == b
    with pytest.raises(InputError, match="no run of that name"):
        resolve_run("smoke/nothing", runs_dir)
    assert recipe_differences(view(a), view(b)) == {"tokenizer.vocab_size": (512, 600)}
    assert json.loads((b / "run.json").read_text())["overrides"] == ["tokenizer.vocab_size=600"]

    main(["runs", "--runs-dir", str(runs_dir)])
    listing = capsys.readouterr().out
    assert f"smoke/{b.name}" in listing and "tokenizer.vocab_size=600" in listing and "tokenizer:completed" in listing
    main(["compare", f"smoke/{a.name}", f"smoke/{b.name}", "--runs-dir", str(runs_dir)])
    table = capsys.readouterr().out
    assert "| tokenizer.vocab_size | 512 | 600 |" in table
    assert "| tokenizer | bytes_per_token_validation |" in table
    html = next((runs_dir / "compare").glob("*.html")).read_text()
    assert "<table>" in html and "vocab_size" in html
    assert "Pretraining losses recorded by: neither run" in html and "(no MLflow run)" in html  # none tracked here
    assert not (runs_dir / "mlflow.db").exists()  # looking for the MLflow runs created no store


def test_hardware_only_settings_make_neither_a_variant_nor_a_stage_key():
    base = load_recipe(SMOKE)
    on_two = load_recipe(SMOKE, ["pretrain.devices=2", "pretrain.strategy=fsdp", "pretrain.expert_parallel=2",
                                 "pretrain.micro_batch_size=2", "pretrain.compile=true"])  # fmt: skip
    assert variant_name(on_two) == variant_name(base)
    assert on_two.section_hash("data", "model", "pretrain", "extend") == base.section_hash("data", "model", "pretrain", "extend")
    assert without_hardware("extend", {"phases": [{"seq_len": 128, "micro_batch_size": 2}]}) == {"phases": [{"seq_len": 128}]}
    tuned = load_recipe(SMOKE, ["pretrain.devices=2", "pretrain.lr_peak=1e-3"])
    assert variant_name(tuned).startswith("lr_peak=1e-3-") and tuned.section_hash("pretrain") != base.section_hash("pretrain")
