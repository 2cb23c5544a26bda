"""dsv3/probes/copy.py on a shrunken recipe: segments of one run measured after each, four models at L and 4L, the
report's tables, a rerun that reads the result back, and recipes that cannot be run refused with the key named; the
YaRN variant's config on the shipped recipe."""

import pytest
import yaml

from dsv3.config import RecipeError
from dsv3.probes.copy import (
    VARIANTS,
    CopyProbeRecipe,
    extended_config,
    load_copy_recipe,
    markdown,
    model_config,
    run,
)
from tests.conftest import RECIPES

SHRINK = {
    "probe": {"train_rows": 64, "eval_rows": 4, "eval_batch_size": 4, "checkpoints": 2, "copy_only_segments": 1,
              "seq_len": 32, "pairs": 2, "queries": 1},
    "model": {"hidden_size": 32, "intermediate_size": 32, "moe_intermediate_size": 16, "kv_lora_rank": 16,
              "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "max_position_embeddings": 32},
    "pretrain": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 4, "val_every_n_steps": 2, "val_max_rows": 4,
                 "checkpoint_every_n_steps": 2, "log_every_n_steps": 1},
    "extend": {"phases": [{"seq_len": 128, "steps": 1, "global_batch_size": 2, "micro_batch_size": 2}],
               "val_every_n_steps": 1, "val_max_rows": 2, "checkpoint_every_n_steps": 1},
}


def shrunk(**changes) -> CopyProbeRecipe:
    raw = yaml.safe_load((RECIPES / "probes" / "copy.yaml").read_text())
    for section, values in (SHRINK | changes).items():
        raw[section] = raw[section] | values if isinstance(values, dict) else values
    return CopyProbeRecipe.model_validate(raw)


def test_shipped_recipe_loads():
    recipe = load_copy_recipe(RECIPES / "probes" / "copy.yaml")
    assert recipe.probe.vocab().size == 64 and recipe.model.num_hidden_layers == 2
    assert recipe.extend.phases[0].seq_len == 4 * recipe.probe.seq_len


def test_yarn_variant_extends_the_training_length_to_the_phase_length():
    recipe = load_copy_recipe(RECIPES / "probes" / "copy.yaml")
    config = extended_config(model_config(recipe), recipe)
    assert config.rope_parameters == {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    }  # fmt: skip
    assert config.max_position_embeddings == 512


@pytest.mark.slow
def test_probe_trains_in_segments_measures_four_models_and_reuses(tmp_path):
    lines = []
    result = run(shrunk(), tmp_path, log=lines.append)
    assert [r["step"] for r in result["training"]] == [0, 2, 4]
    assert set(result["variants"]) == set(VARIANTS)
    for measured in result["variants"].values():
        assert set(measured) == {"32", "128"}
        assert all(0 <= m["retrieval_accuracy"] <= 1 and m["first_copy_loss"] > 0 for m in measured.values())
    # plain RoPE untouched equals the last training measurement at L: the same model, the same rows
    assert result["variants"]["plain RoPE"]["32"]["induction_gain"] == pytest.approx(result["training"][-1]["induction_gain"])
    assert max(r["step"] for r in result["history"]) == 4  # the segments add up to one run of 4 steps
    counted = [r for r in result["history"] if "train/tokens_seen" in r]  # rows of fixed length 32 are counted
    assert counted and all(r["train/tokens_seen"] % 32 == 0 and r["train/tokens_per_s"] > 0 for r in counted)
    assert counted[-1]["train/tokens_seen"] == 4 * shrunk().pretrain.global_batch_size * 32
    text = (tmp_path / "copy.md").read_text()
    assert text == markdown(result) and "| YaRN, trained at 4x |" in text and (tmp_path / "curves.png").is_file()
    again = run(shrunk(), tmp_path, log=lines.append)
    assert again["reused"] and again["variants"] == result["variants"] and "reusing" in lines[-1]


@pytest.mark.parametrize("changes, key", [
    ({"pretrain": SHRINK["pretrain"] | {"steps": 5}}, "pretrain.steps"),
    ({"pretrain": SHRINK["pretrain"] | {"lr_warmup_fraction": 0.1}}, "pretrain.lr_warmup_fraction"),
    ({"extend": SHRINK["extend"] | {"phases": [{"seq_len": 64, "steps": 1}]}}, "extend.phases"),
    ({"probe": SHRINK["probe"] | {"pairs": 4, "queries": 2}}, "probe.seq_len"),
    ({"probe": SHRINK["probe"] | {"copy_only_segments": 2}}, "probe.copy_only_segments"),
])
def test_recipes_that_cannot_run_are_refused(changes, key, tmp_path):
    with pytest.raises(ValueError, match=key):
        shrunk(**changes)
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {}\n")
    with pytest.raises(RecipeError, match="bad.yaml: pretrain: required key is missing"):
        load_copy_recipe(path)
