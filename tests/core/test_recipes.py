import pytest

from slimformer.errors import RecipeError
from slimformer.recipes import builtin_recipes, load_recipe
from slimformer.recipes.schema import parse_recipe
from slimformer.techniques.quant.rtn import RTN

REQUIRED = ("rtn-w8", "rtn-w4", "rtn-w4-g128", "rtn-w4-g64", "rtn-w4-g32", "rtn-w3-g64")


def test_required_builtins_parse_to_rtn_stages():
    names = builtin_recipes()
    for name in REQUIRED:
        assert name in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.stages and recipe.text == names[name]
    g32 = load_recipe("rtn-w4-g32").stages[0]
    assert g32 == RTN(bits=4, granularity="group", group_size=32, symmetric=False)


@pytest.mark.parametrize("text,key", [
    ("stages: [", "invalid recipe YAML"),
    ("- RTN", "mapping"),
    ("stages: []", "stages"),
    ("stages:\n  - Magic: {}", "Magic"),
    ("stages:\n  - RTN: {bitz: 4}", "bitz"),
    ("stages:\n  - RTN: {bits: four}", "bits"),
    ("stages:\n  - RTN: {bits: 9}", "bits"),
    ("stages:\n  - RTN: {granularity: row}", "granularity"),
    ("stages:\n  - RTN: {targets: {includ: x}}", "includ"),
    ("name: x\nstagez: []", "stagez"),
])
def test_bad_recipes_name_the_key(text, key):
    with pytest.raises(RecipeError, match=key):
        parse_recipe(text)


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("no-such-recipe")
