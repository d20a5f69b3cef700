"""The Space's form and YAML editor stay in step both ways, through the engine's validation."""

from __future__ import annotations

import pytest
import yaml

from engine import METHODS, RecipeError
from space.compose import (
    MergeForm,
    ModelRow,
    example_form,
    form_to_yaml,
    per_model_params,
    shared_params,
    yaml_to_form,
)


def test_fields_come_from_the_method_declarations() -> None:
    assert [p.name for p in per_model_params("ties")] == ["weight", "density"]
    assert [p.name for p in shared_params("slerp")] == ["t"]
    assert "normalize" in [p.name for p in shared_params("ties")]
    assert "int8_mask" not in [p.name for p in shared_params("ties")]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_valid_example_that_round_trips(method: str) -> None:
    form = example_form(method, "org/base", ["org/math", "org/code"])
    text = form_to_yaml(form)
    reading = yaml_to_form(text)
    assert reading.advanced is None
    assert reading.form is not None
    assert form_to_yaml(reading.form) == text


def test_form_to_yaml_is_mergekit_yaml() -> None:
    form = MergeForm(
        method="ties",
        base_model="org/base",
        models=(
            ModelRow("org/math", {"weight": 0.7, "density": 0.5}),
            ModelRow("org/code", {"weight": 0.3, "density": 0.6}),
        ),
        shared={"normalize": True, "lambda": 1.0},
        dtype="bfloat16",
    )
    recipe = yaml.safe_load(form_to_yaml(form))
    assert recipe == {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/math", "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": "org/code", "parameters": {"weight": 0.3, "density": 0.6}},
        ],
        "dtype": "bfloat16",
    }  # defaults (normalize, lambda) are left out, as people write them


def test_yaml_the_form_cannot_show_is_kept_as_yaml() -> None:
    gradient = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [0, 1]}\n"
    reading = yaml_to_form(gradient)
    assert reading.form is None and "varies by layer" in (reading.advanced or "")
    sliced = (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
    )
    assert "slices" in (yaml_to_form(sliced).advanced or "")
    per_module = (
        "merge_method: linear\nmodules:\n  text_decoder:\n    models: [{model: a, parameters: {weight: 1}}]\n"
    )
    reading = yaml_to_form(per_module)
    assert reading.form is None and "`modules`" in (reading.advanced or "")


def test_bad_yaml_reports_like_everywhere_else() -> None:
    with pytest.raises(RecipeError, match="density"):
        yaml_to_form(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 2}\n"
        )
