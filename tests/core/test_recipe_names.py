"""Recipe files are bounded and typed, and a recipe's name is a plain name: it becomes a
directory inside compare's output (models/NAME), which the compress step replaces, so an
absolute or '..' name must never reach the file system (the known hole: it escaped the
output and the overwrite removed the target)."""

from __future__ import annotations

import pytest

from slimformer import api
from slimformer.errors import RecipeError
from slimformer.models.tiny import tiny_model, tiny_tokenizer
from slimformer.recipes.schema import MAX_RECIPE_BYTES, Recipe, load_recipe, parse_recipe

BODY = "stages:\n  - RTN: {bits: 8}\n"


@pytest.mark.parametrize("line", ["name: ../victim", "name: /tmp/victim", "name: a/b", "name: ..", "name: .hidden",
                                  "name: 'a\\b'", "name: ''", "name: " + "x" * 101, "name: a..b", "name: with space",
                                  "name: é", "name: [1, 2]", "name: {a: 1}", "name: 7"])
def test_unsafe_names_refused(line):
    with pytest.raises(RecipeError, match="not a plain name"):
        parse_recipe(f"{line}\n{BODY}")


@pytest.mark.parametrize("name", ["rtn-w4-g32", "hawq-4.5", "my_recipe+v2", "A1"])
def test_plain_names_kept(name):
    assert parse_recipe(f"name: {name}\n{BODY}").name == name


def test_python_recipes_are_checked_too():
    with pytest.raises(RecipeError, match="not a plain name"):
        Recipe("../../x", [])


def test_file_name_as_default_name(tmp_path):
    good = tmp_path / "w8.yaml"
    good.write_text(BODY)
    assert load_recipe(str(good)).name == "w8"
    bad = tmp_path / "my recipe.yaml"
    bad.write_text(BODY)
    with pytest.raises(RecipeError, match="add a 'name:' key"):
        load_recipe(str(bad))


def test_recipe_files_bounded_and_yaml_errors_one_line(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(BODY + "#" * MAX_RECIPE_BYTES)
    with pytest.raises(RecipeError, match="bytes, more than"):
        load_recipe(str(big))
    for text, fragment in (("a: &x [1]\nstages: *x\n", "aliases"), ("stages: " + "[" * 5000, "YAML"),
                           ("stages:\n  - RTN: {bits: 8}\x00\n", "YAML"), ("description: [1]\n" + BODY, "description")):
        with pytest.raises(RecipeError, match=fragment) as err:
            parse_recipe(text)
        assert "\n" not in str(err.value)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe" + BODY.encode())
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(str(binary))


@pytest.mark.parametrize("save_models", [False, True])
def test_compare_never_leaves_its_output_with_a_recipe_name(tmp_path, save_models):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    recipe = load_recipe("rtn-w8")
    for name in (str(victim), f"../../{victim.name}", "../victim"):
        recipe.name = name    # set after construction: compare checks again where it joins the path
        with pytest.raises(RecipeError, match="plain name|outside"):
            api.compare((tiny_model("llama"), tiny_tokenizer()), [recipe], data="pydoc", out=tmp_path / "report" / "r",
                        windows=1, seqlen=16, speed=False, save_models=save_models, progress=False)
    assert (victim / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "report").exists()
