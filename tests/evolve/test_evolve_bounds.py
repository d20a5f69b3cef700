"""Hostile search files are refused like hostile recipes: same parser, same bounds, every number finite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_models import Family

from engine.evolve import SearchFileError, load_search
from engine.evolve.spec import parse_search
from mergebot.cli import main


def refusal(path: Path) -> str:
    with pytest.raises(SearchFileError) as info:
        load_search(path)
    return str(info.value)


def test_an_alias_bomb_search_file_is_refused_by_load_search_and_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 11)]
    path = tmp_path / "bomb.yml"
    path.write_text("method: linear\n" + "\n".join(levels) + "\n", encoding="utf-8")
    assert "anchors and aliases" in refusal(path)
    assert main(["evolve", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "anchors and aliases" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"parameters": {"weight": {"min": float("nan"), "max": 1.0}}}, "parameters.weight.min"),
        ({"parameters": {"weight": {"min": 0.0, "max": "inf"}}}, "parameters.weight.max"),
        ({"budget": {"minutes": float("inf")}}, "budget.minutes"),
        ({"fixed": {"lambda": "nan"}}, "lambda"),
    ],
)
def test_every_number_of_a_search_file_must_be_finite(
    llama_family: Family, write_search: Any, overrides: dict[str, Any], expected: str
) -> None:
    message = refusal(write_search(llama_family, **overrides))
    assert expected in message and "finite" in message


def test_a_search_file_names_at_most_64_models() -> None:
    text = "method: linear\nbase_model: a/base\nmodels:\n" + "".join(f"  - a/m{i}\n" for i in range(65))
    with pytest.raises(SearchFileError, match=r"models \(line 3\): at most 64 models are accepted, got 65"):
        parse_search(text)
