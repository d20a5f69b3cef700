"""Hostile recipes: alias bombs, deep nesting, huge files, non-finite numbers, too many models.

Each is refused by :func:`engine.load_recipe` (and so by every entry point) with a one-line
reason, before anything is expanded: a ten-level alias bomb would need terabytes if it were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine import RecipeError, load_recipe
from engine.safe_yaml import MAX_BYTES, YamlRefused, parse_bounded
from mergebot.cli import main

LINEAR = "merge_method: linear\nmodels:\n  - model: a/b\n    parameters: {weight: 1}\n  - model: a/c\n    parameters: {weight: 1}\n"


def alias_bomb(levels: int, width: int = 9) -> str:
    """``levels`` lists of ``width`` aliases to the list below: width**levels strings once expanded."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "merge_method: linear\n" + "\n".join(lines) + "\n"


def refusal(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    return str(info.value)


def test_a_ten_level_alias_bomb_is_refused_before_it_is_expanded() -> None:
    message = refusal(alias_bomb(10))
    assert "anchors and aliases" in message and "line 2" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize(
    "text",
    [
        "merge_method: linear\nbase: &b a/b\n",  # an anchor alone is refused too
        "merge_method: linear\nmodels: [{model: a/b}]\nslices: *nothing\n",  # an undefined alias
        "merge_method: linear\n<<: &m {base_model: a/b}\n",
    ],
)
def test_anchors_and_aliases_are_refused_wherever_they_appear(text: str) -> None:
    assert "anchors and aliases" in refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "merge_method: " + "[" * 60_000,  # deeper than Python's recursion limit if composed
        "".join("  " * i + f"k{i}:\n" for i in range(200)),
    ],
)
def test_deep_nesting_is_refused(text: str) -> None:
    assert "nested more than" in refusal(text)


def test_text_above_the_size_limit_is_refused_from_text_and_from_a_file(tmp_path: Path) -> None:
    big = LINEAR + "# " + "x" * MAX_BYTES + "\n"
    assert "larger than 64 KiB" in refusal(big)
    path = tmp_path / "big.yml"
    path.write_text(big, encoding="utf-8")
    with pytest.raises(RecipeError, match="larger than 64 KiB"):
        load_recipe(path)
    assert load_recipe(LINEAR + "# " + "x" * (MAX_BYTES - len(LINEAR) - 3) + "\n").models is not None


def test_a_file_that_is_not_utf8_gets_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(LINEAR.encode() + b"# caf\xe9\n")
    with pytest.raises(RecipeError, match="not UTF-8 text"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (".nan", "`.nan` is not a finite number"),
        ("-.inf", "`-.inf` is not a finite number"),
        ("1.0e+999", "`1.0e+999` is not a finite number"),
        ("'nan'", "expected a finite number, got nan"),  # a string, coerced to a float by the method
        ("1e999", "expected a finite number, got inf"),  # YAML 1.1 reads this as a string
    ],
)
def test_a_weight_that_is_not_finite_is_refused(value: str, shown: str) -> None:
    message = refusal(LINEAR.replace("{weight: 1}", f"{{weight: {value}}}", 1))
    assert "models[0].parameters.weight (line 4)" in message and shown in message


def test_every_number_of_a_recipe_must_be_finite_not_only_parameters() -> None:
    text = "merge_method: passthrough\nslices:\n  - sources: [{model: a/b, layer_range: [0, 2]}]\n    residual_weight: .nan\n"
    assert "slices[0].residual_weight (line 4): `.nan` is not a finite number" in refusal(text)
    with pytest.raises(RecipeError, match="finite"):
        load_recipe(text.replace(".nan", "'inf'"))  # a string pydantic would read as infinity


def test_an_integer_beyond_64_bits_is_refused_without_being_converted() -> None:
    assert "random_seed (line 2): `99999999999999999999` is too large" in refusal(
        "merge_method: linear\nrandom_seed: 99999999999999999999\n"
    )
    assert "too large" in refusal("merge_method: linear\nrandom_seed: " + "9" * 60_000 + "\n")


def test_model_and_slice_counts_are_bounded() -> None:
    many = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: a/m{i}\n    parameters: {{weight: 1}}\n" for i in range(65)
    )
    assert "models (line 2): at most 64 models are accepted, got 65" in refusal(many)
    slices = "merge_method: passthrough\nslices:\n" + "".join(
        f"  - sources: [{{model: a/b, layer_range: [{i}, {i + 1}]}}]\n" for i in range(257)
    )
    assert "at most 256 slices are accepted, got 257" in refusal(slices)
    at_the_limit = many.replace("  - model: a/m64\n    parameters: {weight: 1}\n", "")
    assert len(load_recipe(at_the_limit).models or []) == 64


def test_parse_bounded_keeps_ordinary_yaml_and_its_lines() -> None:
    data, node = parse_bounded(LINEAR)
    assert data == yaml.safe_load(LINEAR)
    assert node is not None and node.value[1][0].start_mark.line == 1
    assert parse_bounded("") == (None, None)
    with pytest.raises(YamlRefused, match="not valid YAML"):
        parse_bounded("a: [1\n")
    with pytest.raises(YamlRefused, match="character #x0007 at position 3"):
        parse_bounded("a: \x07\n")


def test_recipes_the_engine_writes_have_no_aliases_so_they_load_again() -> None:
    config = load_recipe(LINEAR.replace("{weight: 1}", "{weight: [0, 1]}"))
    assert "&" not in config.to_yaml() and load_recipe(config.to_yaml()) == config


def test_the_cli_refuses_an_alias_bomb_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "bomb.yml"
    recipe.write_text(alias_bomb(10), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Invalid recipe in ") and "anchors and aliases" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_the_cli_refuses_a_nan_weight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "nan.yml"
    recipe.write_text(LINEAR.replace("{weight: 1}", "{weight: .nan}", 1), encoding="utf-8")
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress", "--device", "cpu"]) == 1
    assert "`.nan` is not a finite number" in capsys.readouterr().err
