"""Strangers' recipes and search files through the Space's Check and Submit: bounded, clear, nothing queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import RecipeError
from mergebot.demo import demo_stack
from space.service import SpaceService

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]

RECIPE = (
    "merge_method: linear\nmodels:\n  - model: demo-lab/tiny-base\n    parameters: {weight: 1}\n"
    "  - model: demo-lab/tiny-math\n    parameters: {weight: 1}\n"
)
BOMB = "".join(
    ["l0: &l0 [x, x, x, x, x, x, x, x, x]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 11)]
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpaceService]:
    data: Path = tmp_path_factory.mktemp("space-hostile")
    with demo_stack(data) as stack:
        yield SpaceService(stack.bot)


def test_check_and_submit_refuse_an_alias_bomb(service: SpaceService) -> None:
    report = service.check(RECIPE + BOMB, name="bomb")
    assert not report.ok and any("anchors and aliases" in p for p in report.problems)
    with pytest.raises(RecipeError, match="anchors and aliases"):
        service.submit(RECIPE + BOMB, name="bomb")
    assert not [j for j in service.bot.store.all() if j.spec.destination.endswith("/bomb")]


def test_check_search_refuses_an_alias_bomb_and_a_nan_range(service: SpaceService) -> None:
    bomb = service.check_search("method: linear\n" + BOMB, name="bomb-search")
    assert any("anchors and aliases" in p for p in bomb.problems)
    nan = service.check_search(
        "method: linear\nbase_model: demo-lab/tiny-base\nmodels: [demo-lab/tiny-math]\n"
        "parameters: {weight: {min: .nan, max: 1}}\n"
        "evaluation: {kind: perplexity, data: 'hf://demo-lab/tiny-base/eval.txt', search_size: 4, report_size: 4}\n"
        "budget: {trials: 2}\n",
        name="nan-search",
    )
    assert any("parameters.weight.min (line 4): `.nan` is not a finite number" in p for p in nan.problems)


def test_check_refuses_a_nan_weight(service: SpaceService) -> None:
    report = service.check(RECIPE.replace("{weight: 1}", "{weight: .nan}", 1), name="nan")
    assert not report.ok and any("`.nan` is not a finite number" in p for p in report.problems)


def test_check_answers_odd_ids_and_disk_paths_by_syntax_only(
    service: SpaceService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = service.check(RECIPE.replace("demo-lab/tiny-math", "'demo-lab/.'"), name="odd")
    assert any("`demo-lab/.` is not a Hub repo id" in p for p in odd.problems), odd.problems
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "space.sqlite").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    answers = [
        "\n".join(service.check(RECIPE.replace("demo-lab/tiny-math", path), name="paths").problems).replace(
            path, "PATH"
        )
        for path in ("secret/space.sqlite", "secret/nothing.sqlite")
    ]
    assert answers[0] == answers[1] and "does not exist on the Hub" in answers[0]


def test_check_reads_parents_from_the_hub_even_where_a_folder_of_that_name_exists(
    service: SpaceService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoy = tmp_path / "demo-lab" / "tiny-math"
    decoy.mkdir(parents=True)
    (decoy / "config.json").write_text('{"model_type": "llama", "hidden_size": 7}', encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # `demo-lab/tiny-math` is now also a folder on the Space's disk
    report = service.check(RECIPE, name="shadowed")
    assert report.ok, report.problems
    assert report.audit is not None and all("@" in r.model for r in report.audit.reports)
