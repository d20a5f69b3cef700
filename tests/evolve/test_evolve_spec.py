"""The search file: validation with locations, and the search space derived from ParamSpecs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_models import Family

from engine.evolve import SearchFileError, build_space, load_search
from engine.methods import METHODS


def problems(path: Path) -> list[str]:
    with pytest.raises(SearchFileError) as info:
        load_search(path)
    return [str(p) for p in info.value.problems]


def test_a_valid_file_loads_with_absolute_paths(llama_family: Family, write_search: Any) -> None:
    spec = load_search(write_search(llama_family))
    assert spec.method == "dare_ties"
    assert spec.models == [str(p.resolve()) for p in llama_family.finetunes[:2]]
    assert Path(spec.evaluation.data).is_absolute()
    assert spec.baselines == ["linear", "ties"]


def test_every_problem_comes_back_at_once_with_its_location_and_line(
    llama_family: Family, write_search: Any
) -> None:
    path = write_search(
        llama_family,
        parameters={
            "weight": {"min": 0.5, "max": 0.2},
            "densty": {"max": 0.9},
            "normalize": {},
            "density": {"max": 1.5},
        },
        budget={},
        colour="blue",
    )
    found = problems(path)
    text = "\n".join(found)
    assert any(p.startswith("budget (line") and "give `trials`, `minutes` or both" in p for p in found), text
    assert any(p.startswith("colour (line") and "unknown field" in p for p in found), text
    assert any("parameters.densty" in p and "Did you mean 'density'" in p for p in found), text
    assert any("parameters.normalize" in p and "only numbers can be searched" in p for p in found), text
    assert any("parameters.density.max" in p and "1.5 must be at most 1" in p for p in found), text
    assert any("parameters.weight" in p and "min (0.5) must be below max (0.2)" in p for p in found), text


def test_pydantic_shape_errors_name_their_fields(llama_family: Family, write_search: Any) -> None:
    path = write_search(
        llama_family,
        evaluation={"kind": "bleu", "data": "x.txt", "search_size": 0, "report_sise": 3},
        seed=-1,
    )
    found = "\n".join(problems(path))
    assert "evaluation.kind" in found and "'perplexity', 'exact_match' or 'loglikelihood'" in found
    assert "evaluation.search_size" in found and "greater than 0" in found
    assert "evaluation.report_sise" in found and "Did you mean `report_size`?" in found
    assert "evaluation.report_size" in found and "is required" in found
    assert "seed" in found


def test_unknown_method_gets_a_suggestion(llama_family: Family, write_search: Any) -> None:
    found = problems(write_search(llama_family, method="dare_tie"))
    assert any(p.startswith("method (line") and "Did you mean 'dare_ties'?" in p for p in found), found


def test_weight_has_no_declared_range_so_the_file_must_give_one(
    llama_family: Family, write_search: Any
) -> None:
    found = problems(write_search(llama_family, parameters={"weight": {}}))
    assert any("parameters.weight.min" in p and "give `min`" in p for p in found), found


def test_missing_models_data_and_required_parameters_are_reported(
    llama_family: Family, write_search: Any, tmp_path: Path
) -> None:
    path = write_search(
        llama_family,
        method="ties",
        models=[str(tmp_path / "nowhere")],
        parameters={"density": {}},
        evaluation={"kind": "perplexity", "data": "missing.txt", "search_size": 2, "report_size": 2},
    )
    found = "\n".join(problems(path))
    assert "models[0]" in found and "is not a model folder" in found
    assert "evaluation.data" in found and "no file at" in found
    assert "ties needs `weight`" in found  # required and neither searched nor fixed


def test_finalists_need_a_validation_split(
    llama_family: Family, write_search: Any, eval_data: dict[str, Path]
) -> None:
    section = {"kind": "perplexity", "data": str(eval_data["text"]), "search_size": 2, "report_size": 2}
    found = "\n".join(problems(write_search(llama_family, evaluation={**section, "finalists": 3})))
    assert "evaluation.finalists" in found and "give `validation_size`" in found
    spec = load_search(
        write_search(llama_family, evaluation={**section, "validation_size": 2, "finalists": 3})
    )
    assert (spec.evaluation.validation_size, spec.evaluation.finalists) == (2, 3)
    assert load_search(write_search(llama_family, evaluation=section)).evaluation.finalists == 5


def test_bad_yaml_says_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("method: ties\nmodels: [a, b\n", encoding="utf-8")
    found = problems(path)
    assert found[0].startswith("line ") and "not valid YAML" in found[0]


def test_space_has_one_dimension_per_model_and_layer_group(llama_family: Family, write_search: Any) -> None:
    spec = load_search(
        write_search(
            llama_family,
            parameters={"weight": {"min": 0.0, "max": 2.0, "layer_groups": 3}, "density": {}},
            fixed={"lambda": 1.1},
        )
    )
    space = build_space(spec)
    keys = [d.key for d in space.dimensions]
    assert keys == [
        "weight[0]@0",
        "weight[0]@1",
        "weight[0]@2",
        "weight[1]@0",
        "weight[1]@1",
        "weight[1]@2",
        "density[0]",
        "density[1]",
    ]
    density = METHODS["dare_ties"].param("density")
    assert density is not None and density.maximum == 1.0
    d = space.dimensions[-1]
    # declared (0, 1]: searched from just above the exclusive minimum up to the declared maximum
    assert 0.0 < d.low < 0.01 and d.high == density.maximum
    values = {k: 0.1 * (i + 1) for i, k in enumerate(keys)}
    recipe = space.recipe(values)
    assert recipe.parameters is not None and "lambda" in recipe.parameters
    first = recipe.models[0].parameters if recipe.models else None
    assert first is not None
    # three layer groups are a three-anchor gradient, interpolated over depth by the plan
    assert first["weight"].branches[0].values == pytest.approx((0.1, 0.2, 0.3))
    assert first["density"].branches[0].values == pytest.approx((0.7,))
    assert recipe.random_seed == spec.seed


@pytest.mark.parametrize(
    ("method", "parameters", "n_models", "expected"),
    [
        ("linear", {"weight": {"min": 0, "max": 1}}, 2, ["weight[0]", "weight[1]"]),
        ("slerp", {"t": {"min": 0, "max": 1}}, 1, ["t"]),
        (
            "task_arithmetic",
            {"weight": {"min": -1, "max": 1}, "lambda": {"min": 0.5, "max": 1.5}},
            2,
            ["weight[0]", "weight[1]", "lambda"],
        ),
        (
            "della",
            {"weight": {"min": 0, "max": 1}, "epsilon": {"min": 0.0, "max": 0.1}},
            2,
            ["weight[0]", "weight[1]", "epsilon[0]", "epsilon[1]"],
        ),
        ("tsv", {"alpha": {"min": 0.5, "max": 2.0}}, 2, ["alpha"]),
        (
            "iso_cts",
            {"alpha": {"min": 0.5, "max": 2.0}, "common_space_fraction": {}},
            2,
            ["alpha", "common_space_fraction"],
        ),
        (
            "wudi",
            {"weight": {"min": 0.5, "max": 1.5}, "steps": {"min": 10, "max": 300}},
            2,
            ["weight[0]", "weight[1]", "steps"],
        ),
    ],
)
def test_any_method_with_numeric_parameters_gives_a_space(
    llama_family: Family,
    write_search: Any,
    method: str,
    parameters: dict[str, Any],
    n_models: int,
    expected: list[str],
) -> None:
    models = [str(p) for p in llama_family.finetunes[:n_models]]
    if method == "slerp":
        models = [str(llama_family.base), *models]
    spec = load_search(write_search(llama_family, method=method, models=models, parameters=parameters))
    space = build_space(spec)
    assert [d.key for d in space.dimensions] == expected
    space.recipe(space.center())  # a valid recipe


def test_the_public_surface_is_deliberate() -> None:
    import engine.evolve

    assert sorted(engine.evolve.__all__) == [
        "EvaluationDataError",
        "InMemoryMerger",
        "ResidentCausalLM",
        "SearchFileError",
        "SearchResult",
        "SearchSpace",
        "SearchSpec",
        "TrialEvent",
        "baseline_recipe",
        "build_space",
        "load_search",
        "run_search",
        "validate_search",
    ]
    assert all(hasattr(engine.evolve, name) for name in engine.evolve.__all__)


def test_a_malformed_range_does_not_hide_problems_elsewhere(llama_family: Family, write_search: Any) -> None:
    path = write_search(
        llama_family,
        parameters={"weight": {"min": 0.1, "max": 1.0, "layer_groups": 0}, "density": {"max": 3}},
    )
    found = "\n".join(problems(path))
    assert "parameters.weight.layer_groups" in found and "greater than or equal to 1" in found
    assert "parameters.density.max" in found and "must be at most 1" in found


def test_off_disk_validation_checks_everything_but_the_files() -> None:
    """A service checks a file naming Hub repos before downloading them: only the paths are skipped."""
    from engine.evolve.spec import validate_search

    data: dict[str, Any] = {
        "base_model": "org/base",
        "models": ["org/a@main", "org/b"],
        "method": "ties",
        "parameters": {"weight": {"min": 0.0, "max": 1.0}, "density": {"min": 0.2, "max": 1.0}},
        "evaluation": {
            "kind": "perplexity",
            "data": "hf://datasets/org/text/eval.txt",
            "search_size": 2,
            "report_size": 2,
        },
        "budget": {"trials": 4},
    }
    spec = validate_search(data, on_disk=False)
    assert spec.models == ["org/a@main", "org/b"]
    with pytest.raises(SearchFileError) as on_disk:
        validate_search(data)
    assert "is not a model folder" in str(on_disk.value) and "no file at" in str(on_disk.value)
    bad = {**data, "parameters": {"weight": {"min": 1.0, "max": 0.0}, "density": {"min": 0.2, "max": 1.0}}}
    with pytest.raises(SearchFileError, match=r"parameters\.weight"):
        validate_search(bad, on_disk=False)
