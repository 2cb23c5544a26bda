"""Recipes: bases, overrides, and one-line errors naming the dotted key (exit code 2 from the CLI)."""

import subprocess
import sys

import pytest

from dsv3.config import STAGE_ORDER, Recipe, RecipeError, flatten, load_recipe
from tests.conftest import RECIPES, REPO


@pytest.mark.parametrize("name", ["smoke", "tiny", "deepseek-v3"])
def test_shipped_recipes_validate(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name


def test_base_overlay_keeps_untouched_values():
    tiny, smoke = load_recipe(RECIPES / "tiny.yaml"), load_recipe(RECIPES / "smoke.yaml")
    assert smoke.model.hidden_size == 32 and tiny.model.hidden_size == 128
    assert smoke.model.routed_scaling_factor == tiny.model.routed_scaling_factor  # inherited
    assert smoke.data.fim_rate == tiny.data.fim_rate


def test_set_overrides_parse_yaml_values():
    recipe = load_recipe(
        RECIPES / "smoke.yaml",
        [
            "data.fim_rate=0.25",
            "model.q_lora_rank=null",
            "tokenizer.vocab_size=600",
            "pipeline.stages=[tokenizer]",
        ],
    )
    assert recipe.data.fim_rate == 0.25 and recipe.model.q_lora_rank is None
    assert recipe.tokenizer.vocab_size == 600


def test_overlay_file(tmp_path):
    (tmp_path / "base.yaml").write_text(
        (RECIPES / "smoke.yaml").read_text().replace("base: tiny.yaml", f"base: {RECIPES / 'tiny.yaml'}")
    )
    (tmp_path / "ablation.yaml").write_text("base: base.yaml\nname: abl\ndata:\n  fim_rate: 0.0\n")
    recipe = load_recipe(tmp_path / "ablation.yaml")
    assert recipe.name == "abl" and recipe.data.fim_rate == 0.0 and recipe.model.hidden_size == 32


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.foo=1", "model.foo: unknown key (allowed: "),
        ("bogus=1", "bogus: unknown key (allowed: checks, data, "),
        ("model.hidden_size=-1", "model.hidden_size: must be > 0 (got -1)"),
        ("data.seq_len=abc", "data.seq_len: Input should be a valid integer"),
        ("data.fim_rate=1.5", "data.fim_rate: Input should be less than or equal to 1"),
        ("model.topk_group=5", "model.topk_group: must be between 1 and n_group (2), got 5"),
        ("model.n_group=3", "model.n_group: must divide n_routed_experts (8), got 3"),
        ("model.scoring_func=relu", "model.scoring_func: 'relu' is not supported; use 'sigmoid' or 'softmax'"),
        ("model.rope_scaling={factor: 4}", "model.rope_scaling: moved — YaRN is set by the extend section"),
        ("pretrain.aux_alpha=1e-3", "pretrain.aux_alpha: moved — set model.aux_loss_alpha instead"),
        ("data.source=local", "data.paths: source=local needs at least one file or folder"),
        ("pipeline.stages=[pretrain,tokenizer]", "pipeline.stages: must be distinct and in the order"),
        ("name=a b", "name: String should match pattern"),
        ("model.hidden_size.x=1", "--set model.hidden_size.x: model.hidden_size is a value, not a section"),
        ("noequals", "--set 'noequals': expected key=value"),
    ],
)
def test_malformed_recipes_give_one_line(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "smoke.yaml", [override])
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text


def test_bad_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML at line"):
        load_recipe(bad_yaml)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\nname: loop\n")
    with pytest.raises(RecipeError, match="builds on itself"):
        load_recipe(loop)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping of sections"):
        load_recipe(listing)


def test_cli_exit_code_two_and_no_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "recipe",
            str(RECIPES / "smoke.yaml"),
            "--set",
            "model.hidden_size=0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dsv3: error: model.hidden_size: must be > 0 (got 0)"
    assert "Traceback" not in proc.stderr


def test_section_hash_changes_only_with_its_sections():
    base = load_recipe(RECIPES / "smoke.yaml")
    other_model = load_recipe(RECIPES / "smoke.yaml", ["model.hidden_size=64"])
    other_seed = load_recipe(RECIPES / "smoke.yaml", ["seed=7"])
    assert base.section_hash("data", "tokenizer") == other_model.section_hash("data", "tokenizer")
    assert base.section_hash("model") != other_model.section_hash("model")
    assert base.section_hash("data") != other_seed.section_hash("data")


def test_flatten_and_stage_order():
    flat = flatten(load_recipe(RECIPES / "smoke.yaml").data, "data")
    assert flat["data.seq_len"] == 64 and all(k.startswith("data.") for k in flat)
    assert STAGE_ORDER == ("tokenizer", "pretrain", "extend", "sft", "reward", "rl")
    assert set(Recipe.model_fields) >= {"name", "seed", "pipeline", "data", "tokenizer", "model"}


SHIPPED = sorted([*RECIPES.glob("*.yaml"), *RECIPES.glob("ablations/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(RECIPES).as_posix() for p in SHIPPED])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name and recipe.model is not None


def test_small_recipe_is_the_one_gpu_run():
    small = load_recipe(RECIPES / "small.yaml")
    assert small.data.source == "hf" and small.data.hf_name and small.data.max_documents
    assert 1024 <= small.data.seq_len <= 2048 and small.model.max_position_embeddings == small.data.seq_len
    assert [p.seq_len for p in small.extend.phases] == [4 * small.data.seq_len, 8 * small.data.seq_len]
    assert small.pretrain.precision == "bf16-mixed" and small.pretrain.accelerator == "gpu"
    assert small.pretrain.bias_update_speed == 0.001 and small.pretrain.lr_decay_start_fraction == 0.676
    assert small.pipeline.stages == list(STAGE_ORDER)


def test_layout_settings_stay_out_of_the_pretrain_key():
    """HSDP, gradient sync and activation checkpointing change where and how a run computes, not what: a stage run
    with them resumes, and is skipped, as the same stage."""
    base = load_recipe(RECIPES / "smoke.yaml")
    layout = load_recipe(RECIPES / "smoke.yaml", [
        "pretrain.devices=2", "pretrain.strategy=fsdp", "pretrain.fsdp_replicate=2",
        "pretrain.gradient_sync=micro_batch", "pretrain.activation_checkpointing=selective",
        "pretrain.activation_checkpointing_every=3",
    ])  # fmt: skip
    assert layout.section_hash("pretrain") == base.section_hash("pretrain")


def test_importing_the_schema_imports_neither_torch_nor_transformers():
    """`import dsv3.config` (the CLI's recipe checks, the flows' parameter handling) stays light: torch and
    transformers come in only when a model section is validated."""
    probe = (
        "import sys\nimport dsv3.config\n"
        "print(sorted(m for m in ('torch', 'transformers', 'lightning') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_model_section_holds_the_fields_of_dsv3config():
    """The recipe's model section spells out DSV3Config's fields (less those set elsewhere) with their types and
    defaults, in their order: the two cannot drift apart."""
    import dataclasses

    from dsv3.config import MODEL_FIELDS_FROM_ELSEWHERE, ModelSection
    from dsv3.model import DSV3Config

    expected = {
        f.name: (f.type, f.default)
        for f in dataclasses.fields(DSV3Config)
        if f.name in DSV3Config.__annotations__ and f.name not in MODEL_FIELDS_FROM_ELSEWHERE
    }
    section = {name: (field.annotation, field.default) for name, field in ModelSection.model_fields.items()}
    assert section.pop("rope_theta") == (float, 10000.0)
    assert section.pop("vocab_size") == (int | None, None)  # the tokenizer's, unless set
    expected.pop("vocab_size")
    assert list(section) == list(expected)
    assert section == expected
    assert set(MODEL_FIELDS_FROM_ELSEWHERE) < set(DSV3Config.__annotations__)
