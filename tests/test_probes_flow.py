"""flows/probes.py: the probe recipes are checked before anything runs, and the report says up front what the tiny
pipeline cannot show, with "missing" for a probe that has not run."""

import pytest

from flows.probes import PREFACE, probe_recipes, report_markdown
from tests.conftest import RECIPES


def test_shipped_probe_recipes_are_found_and_valid():
    assert probe_recipes(RECIPES / "probes", None) == {
        "copy": str(RECIPES / "probes" / "copy.yaml"), "grpo": str(RECIPES / "probes" / "grpo.yaml")}
    assert list(probe_recipes(RECIPES / "probes", ["grpo"])) == ["grpo"]


def test_bad_probe_folders_and_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--only passkey: not a probe"):
        probe_recipes(RECIPES / "probes", ["passkey"])
    with pytest.raises(ValueError, match="no recipes"):
        probe_recipes(tmp_path, None)
    (tmp_path / "grpo.yaml").write_text(f"base: {RECIPES / 'tiny.yaml'}\nname: g\npipeline: {{stages: [tokenizer, pretrain]}}\n")
    with pytest.raises(ValueError, match="must end with rl"):
        probe_recipes(tmp_path, None)
    (tmp_path / "extra.yaml").write_text("name: x\n")
    with pytest.raises(ValueError, match="extra.yaml: not a probe"):
        probe_recipes(tmp_path, None)


def test_report_states_the_limits_first_and_marks_missing_probes():
    text = report_markdown({"copy": "COPY TABLE"}, ["grpo seed 1: boom"])
    assert text.startswith(PREFACE) and "10^7" in text and "Olsson" in text
    assert text.index("COPY TABLE") < text.index("missing: the GRPO probe has not run")
    assert text.rstrip().endswith("Failed: grpo seed 1: boom (rerun `make probes` to resume).")
