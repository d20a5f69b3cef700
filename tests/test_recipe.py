"""Recipe parsing and validation: mergekit's forms accepted, every mistake reported at once."""

from __future__ import annotations

import contextlib

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import load_recipe, parse_setting, validate_recipe
from engine.errors import RecipeError
from engine.methods import get_method

TIES = """\
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0, 0.5, 1]
      density: 0.5
  - model: b
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - filter: mlp
          value: [0.1, 0.9]
        - value: 0.7
      density: 0.6
parameters:
  normalize: true
dtype: bfloat16
"""


def test_mergekit_forms_parse_and_round_trip() -> None:
    config = load_recipe(TIES)
    assert config.merge_method == "ties" and config.base_model == "base"
    assert config.referenced_models() == ["base", "a", "b"]
    again = load_recipe(config.to_yaml())
    assert again == config
    assert "weight: [0, 0.5, 1]" in config.to_yaml()  # gradients stay on one line


def test_gradients_interpolate_like_mergekit() -> None:
    spec = get_method("ties").param("weight")
    assert spec is not None
    gradient = parse_setting([0.0, 0.5, 1.0])
    assert gradient.resolve("x", 0.0, spec) == 0.0
    assert gradient.resolve("x", 0.25, spec) == pytest.approx(0.25)
    assert gradient.resolve("x", 1.0, spec) == 1.0
    two = parse_setting([0.2, 0.8])
    assert two.resolve("x", 0.5, spec) == pytest.approx(0.5)


def test_filters_match_by_substring_first_wins() -> None:
    spec = get_method("ties").param("weight")
    assert spec is not None
    setting = parse_setting(
        [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.7}]
    )
    assert setting.resolve("model.layers.0.self_attn.q_proj.weight", 0.5, spec) == 0.3
    assert setting.resolve("model.layers.0.mlp.up_proj.weight", 0.5, spec) == pytest.approx(0.5)
    assert setting.resolve("model.norm.weight", 0.5, spec) == 0.7
    only = parse_setting({"filter": "mlp", "value": 1})
    assert only.resolve("model.norm.weight", 0.0, spec) is None  # falls through to the next level


def test_yaml_scientific_notation_strings_are_numbers() -> None:
    config = load_recipe("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1e-3}\n")
    assert config.models is not None


def test_all_problems_are_reported_at_once_with_locations_and_lines() -> None:
    text = """\
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 1
      density: 1.5
  - model: b
    parameters:
      density: 0
      densty: 0.2
dtype: fp8
parametrs: {}
"""
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    message = str(info.value)
    problems = [str(p) for p in info.value.problems]
    assert any(p.startswith("models[0].parameters.density (line 7)") and "at most 1" in p for p in problems)
    assert any(
        p.startswith("models[1].parameters.density (line 10)") and "greater than 0" in p for p in problems
    )
    assert any(p.startswith("models[1]") and "needs `weight`" in p for p in problems)
    assert any("dtype (line 12)" in p for p in problems)
    # mergekit ignores unknown parameters and keys: notes, not problems, and shown with the refusal
    assert not any("densty" in p or "parametrs" in p for p in problems)
    # in the order they are written
    assert "models[1].parameters.densty (line 11): parameter 'densty' has no effect" in info.value.notes[0]
    assert "(did you mean 'density'?)" in info.value.notes[0]
    assert info.value.notes[1].startswith("parametrs (line 13): field 'parametrs' has no effect")
    assert "(did you mean `parameters`?)" in info.value.notes[1]
    assert message.startswith("Invalid recipe (")
    assert message.endswith("\n".join(f"note: {n}" for n in info.value.notes))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("merge_method: tie\nmodels: [{model: a}]", "Did you mean 'ties'"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "needs a `base_model`"),
        (
            "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\nparameters: {t: 1.5}",
            "at most 1",
        ),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]", "needs `t`"),
        (
            "merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}",
            "at most 2 models",
        ),
        ("merge_method: linear", "exactly one of `models`"),
        ("merge_method: linear\nmodels: [{model: a}]", "needs `weight`"),
        ("merge_method: passthrough\nmodels: [{model: a}, {model: b}]", "use `slices`"),
        (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [4, 2]",
            "0 <= start < end",
        ),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [1, x]}}]", "expected a number"),
        ("- just\n- a list", "must be a YAML mapping"),
        ("merge_method: [unclosed", "not valid YAML"),
        (
            "merge_method: ties\nbase_model: a\nmodules: {vision: {models: [{model: b}]}}",
            "unknown module 'vision'. Did you mean 'vision_tower'",
        ),
        (
            "merge_method: ties\nbase_model: a\nmodules: {text_decoder: {parameters: {weight: 1}}}",
            "exactly one of `models` or `slices` for this module",
        ),
        (
            "merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\n"
            "modules: {text_decoder: {models: [{model: b, parameters: {weight: 1}}]}}",
            "or `modules` \\(merge each module",
        ),
    ],
)
def test_bad_recipes_get_specific_messages(text: str, expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        load_recipe(text)


def test_parameters_of_other_methods_are_tolerated() -> None:
    # copied recipes often carry `density` into a linear merge: mergekit ignores it, so do we
    load_recipe("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]")


def test_recipe_file_that_does_not_exist() -> None:
    with pytest.raises(RecipeError, match="cannot read the recipe file"):
        load_recipe("/nonexistent/recipe.yml")


_scalars = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans(), st.text(max_size=5)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(
    [
        "merge_method",
        "base_model",
        "models",
        "slices",
        "parameters",
        "dtype",
        "out_dtype",
        "tokenizer_source",
        "chat_template",
        "random_seed",
        "weight",
        "density",
        "t",
        "model",
        "sources",
        "layer_range",
        "filter",
        "value",
    ]
)


@settings(max_examples=400, deadline=None)
@given(data=st.dictionaries(_keys, _values, max_size=6))
def test_fuzz_recipes_either_validate_or_raise_recipe_error(data: dict[str, object]) -> None:
    try:
        validate_recipe(data)
    except RecipeError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzz_yaml_text(text: str) -> None:
    with contextlib.suppress(RecipeError):
        load_recipe(text + "\n")


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.floats(-2, 2), min_size=1, max_size=4),
    density=st.floats(0.01, 1.0),
)
def test_fuzz_valid_recipes_round_trip(weights: list[float], density: float) -> None:
    recipe = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": f"m{i}", "parameters": {"weight": w, "density": density}} for i, w in enumerate(weights)
        ],
    }
    config = validate_recipe(recipe)
    assert load_recipe(config.to_yaml()) == config
    assert yaml.safe_load(config.to_yaml())["models"][0]["model"] == "m0"
