"""dsv3/stages/__init__.py: every stage of the recipe schema is declared by its module, and the two halves agree."""

import pytest

from dsv3.config import STAGE_ORDER, STAGES
from dsv3.stages import available_stages, get_stage


@pytest.mark.parametrize("name", STAGE_ORDER)
def test_each_stage_declares_itself_and_measures_every_check_its_recipe_section_sets(name):
    stage = get_stage(name)
    assert stage.name == name and stage.module.__name__ == f"dsv3.stages.{name}"
    assert set(stage.checks) == set(STAGES[name].checks.model_fields)  # checks.<name>.<field> -> its measure
    assert name in stage.sections and stage.outputs and stage.headline
    assert set(stage.tunable) <= set(stage.sections)


def test_every_stage_is_built():
    assert available_stages() == list(STAGE_ORDER)
