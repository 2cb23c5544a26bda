"""dsv3/stages/__init__.py: every stage of the recipe schema is declared by its module, and the two halves agree; an
installed package's stages are found through the `dsv3.stages` entry points."""

import sys

import pytest

from dsv3.config import STAGE_ORDER, STAGES, RecipeError, load_recipe
from dsv3.stages import available_stages, discover, get_stage, unregister
from tests.conftest import RECIPES

PLUGIN = '''"""A stage an installed package publishes."""
from dsv3.config import Section
from dsv3.store import Stage, StageResult


class PluggedSection(Section):
    words: int = 3


def run(recipe, workdir, inputs):
    return StageResult(outputs=[])


STAGE = Stage(name="plugged", run=run, sections=("plugged",), section=PluggedSection)
'''


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_each_stage_declares_itself_and_measures_every_check_its_recipe_section_sets(name):
    stage = get_stage(name)
    assert stage.name == name and stage.module.__name__ == f"dsv3.stages.{name}"
    assert set(stage.checks) == set(STAGES[name].checks.model_fields)  # checks.<name>.<field> -> its measure
    assert name in stage.sections and stage.outputs and stage.headline
    assert set(stage.tunable) <= set(stage.sections)


def test_every_stage_is_built():
    assert available_stages() == list(STAGE_ORDER)


@pytest.fixture
def install(tmp_path, monkeypatch):
    """Install a one-module distribution publishing the entry point `plugged` (a *.dist-info folder on sys.path)."""

    def write(module_text: str) -> None:
        info = tmp_path / "dsv3_plugged-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dsv3-plugged\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[dsv3.stages]\nplugged = dsv3_plugged:STAGE\n")
        (tmp_path / "dsv3_plugged.py").write_text(module_text)
        monkeypatch.syspath_prepend(str(tmp_path))
        discover.cache_clear()

    yield write
    unregister("plugged")
    sys.modules.pop("dsv3_plugged", None)
    discover.cache_clear()


def test_an_installed_stage_is_found_through_its_entry_point(install):
    install(PLUGIN)
    recipe = load_recipe(RECIPES / "smoke.yaml", ["pipeline.stages=[tokenizer,plugged]", "plugged.words=5"])
    assert recipe.pipeline.stages == ["tokenizer", "plugged"] and recipe.plugged.words == 5
    assert get_stage("plugged").module.__name__ == "dsv3_plugged"


def test_a_plugin_that_cannot_be_imported_is_one_line_naming_its_entry_point(install):
    install("raise ImportError(\"No module named 'missing_dependency'\")\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "smoke.yaml")
    assert str(err.value) == (
        "entry point plugged = dsv3_plugged:STAGE (group dsv3.stages, package dsv3-plugged): cannot load it "
        "(ImportError: No module named 'missing_dependency'); mend or uninstall it"
    )
