"""``kind: lm_eval``: validation with locations, and a local lm-eval task scoring the tiny model in memory."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import Family
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.evolve import EvaluationDataError, SearchFileError, load_search, run_search
from engine.evolve.evaluate import load_evaluator
from engine.evolve.spec import Evaluation

# A multiple-choice task over a local JSONL file (relative path: read from the task folder). The
# choices carry their leading space, so the continuation is exactly the choice (no delimiter).
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{prompt}}"
doc_to_choice: choices
doc_to_target: "{{choices.index(answer)}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory: pytest.TempPathFactory, eval_data: dict[str, Path]) -> Path:
    """tiny_mc.yaml over items.jsonl: the prompt/answer/choices items of the other evaluations."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    (folder / "tiny_mc.yaml").write_text(TASK_YAML, encoding="utf-8")
    (folder / "items.jsonl").write_text(eval_data["jsonl"].read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def n_items(folder: Path) -> int:
    return sum(
        1 for line in (folder / "items.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()
    )


def lm_eval_section(**overrides: Any) -> dict[str, Any]:
    return {"kind": "lm_eval", "tasks": ["tiny_mc"], "search_size": 6, "report_size": 6, **overrides}


def problems(path: Path) -> list[str]:
    with pytest.raises(SearchFileError) as info:
        load_search(path)
    return [str(p) for p in info.value.problems]


def test_an_unknown_key_gets_a_suggestion(llama_family: Family, write_search: Any) -> None:
    section = lm_eval_section(taks=["tiny_mc"])
    del section["tasks"]
    found = problems(write_search(llama_family, evaluation=section))
    assert any(p.startswith("evaluation.taks (line") and "Did you mean `tasks`?" in p for p in found), found


def test_missing_tasks_and_a_missing_folder_are_reported_together(
    llama_family: Family, write_search: Any, tmp_path: Path
) -> None:
    section = lm_eval_section(data=str(tmp_path / "nowhere"), max_new_tokens=4)
    del section["tasks"]
    found = problems(write_search(llama_family, evaluation=section))
    text = "\n".join(found)
    assert any(
        p.startswith("evaluation.tasks (line") and "is required for kind: lm_eval" in p for p in found
    ), text
    assert any(p.startswith("evaluation.data (line") and "no folder at" in p for p in found), text
    assert any(
        p.startswith("evaluation.max_new_tokens") and "only used by kind: exact_match" in p for p in found
    )


def test_lm_eval_fields_belong_to_lm_eval_and_data_to_the_other_kinds(
    llama_family: Family, write_search: Any, tmp_path: Path
) -> None:
    found = "\n".join(
        problems(
            write_search(
                llama_family,
                evaluation={
                    "kind": "perplexity",
                    "tasks": ["x"],
                    "num_fewshot": 2,
                    "search_size": 1,
                    "report_size": 1,
                },
            )
        )
    )
    assert "evaluation.data" in found and "is required" in found
    assert "evaluation.tasks" in found and "only used by kind: lm_eval" in found
    assert "evaluation.num_fewshot" in found
    empty = tmp_path / "empty"
    empty.mkdir()
    found = "\n".join(
        problems(write_search(llama_family, evaluation=lm_eval_section(data=str(empty), block_size=8)))
    )
    assert "evaluation.data" in found and "holds no lm-eval task YAML files" in found
    assert "evaluation.block_size" in found and "only used by kind: perplexity" in found


def test_without_lm_eval_installed_validation_says_how_to_install_it(
    llama_family: Family, write_search: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: `import lm_eval` fails
    found = problems(write_search(llama_family, evaluation=lm_eval_section()))
    assert any(
        p.startswith("evaluation.kind (line") and "pip install 'mergebot[lm-eval]'" in p for p in found
    ), found


def test_a_task_folder_loads_with_its_path_resolved(
    llama_family: Family, write_search: Any, task_folder: Path
) -> None:
    pytest.importorskip("lm_eval")
    spec = load_search(write_search(llama_family, evaluation=lm_eval_section(data=str(task_folder))))
    assert spec.evaluation.data == str(task_folder.resolve())
    assert spec.evaluation.tasks == ["tiny_mc"]


# ---------------------------------------------------------------- with lm-eval


@pytest.fixture(scope="module")
def tiny(llama_family: Family) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(llama_family.base, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(llama_family.base)


def test_splits_are_disjoint_and_scores_match_the_loglikelihood_kind(
    task_folder: Path, tiny: tuple[Any, Any], llama_family: Family
) -> None:
    pytest.importorskip("lm_eval")
    model, tok = tiny
    section = Evaluation(
        kind="lm_eval", tasks=["tiny_mc"], data=str(task_folder), search_size=8, report_size=8
    )
    ev: Any = load_evaluator(section, tok, seed=0)
    search, report = ev.splits["search"]["tiny_mc"], ev.splits["report"]["tiny_mc"]
    assert len(search) == 8 and len(report) == 8 and not set(search) & set(report)
    assert list(search) == sorted(search) and max(search + report) < n_items(task_folder)
    assert ev.direction == "maximize" and ev.metric == "acc (lm-eval: tiny_mc)"
    assert load_evaluator(section, tok, seed=1).splits != ev.splits
    validated: Any = load_evaluator(section.model_copy(update={"validation_size": 5}), tok, seed=0)
    validation = validated.splits["validation"]["tiny_mc"]
    assert (
        validated.splits["search"] == ev.splits["search"]
        and validated.splits["report"] == ev.splits["report"]
    )
    assert len(validation) == 5 and list(validation) == sorted(validation)
    assert not set(validation) & set(search + report)

    # The same items, split by the same seed, scored by mergebot's own log-likelihood accuracy:
    # lm-eval's multiple-choice `acc` is the same argmax over the choices' summed log-probabilities.
    own = load_evaluator(
        Evaluation(kind="loglikelihood", data=str(task_folder / "items.jsonl"), search_size=8, report_size=8),
        tok,
        seed=0,
    )
    for split in ("search", "report"):
        assert ev.score(model, split) == pytest.approx(own.score(model, split)), split
    # the resident model's weights change in place between trials: the next score sees them
    other = AutoModelForCausalLM.from_pretrained(llama_family.finetunes[0], dtype=torch.float32)
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
    assert ev.score(model, "search") == pytest.approx(own.score(model, "search"))
    assert ev.score(model, "search") == ev.score(model, "search")  # same prompts every call


@pytest.mark.slow  # an unknown name is looked up among lm-eval's own tasks: indexing them takes seconds
def test_unknown_tasks_and_small_tasks_are_data_errors(task_folder: Path, tiny: tuple[Any, Any]) -> None:
    pytest.importorskip("lm_eval")
    _, tok = tiny
    with pytest.raises(
        EvaluationDataError, match=r"no lm-eval task named 'tiny_mcq'.*Did you mean 'tiny_mc'"
    ):
        load_evaluator(
            Evaluation(
                kind="lm_eval", tasks=["tiny_mcq"], data=str(task_folder), search_size=1, report_size=1
            ),
            tok,
            seed=0,
        )
    n = n_items(task_folder)
    with pytest.raises(EvaluationDataError, match=f"has {n} evaluation documents, fewer than .* = {n + 1}"):
        load_evaluator(
            Evaluation(
                kind="lm_eval", tasks=["tiny_mc"], data=str(task_folder), search_size=n, report_size=1
            ),
            tok,
            seed=0,
        )


@pytest.mark.slow
def test_a_search_scores_trials_and_the_report_on_an_lm_eval_task(
    llama_family: Family, write_search: Any, task_folder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("lm_eval")
    spec = load_search(
        write_search(
            llama_family,
            evaluation=lm_eval_section(data=str(task_folder)),
            budget={"trials": 1},
            baselines=["linear"],
        )
    )
    result = run_search(spec, str(tmp_path / "out"))
    assert result is not None and result.direction == "maximize"
    assert len(result.trials) == 2 and all(0.0 <= t.score <= 1.0 for t in result.trials)
    assert set(result.held_out) == {"best", "linear"}
    report = (tmp_path / "out" / "REPORT.md").read_text(encoding="utf-8")
    assert "acc (lm-eval: tiny_mc)" in report and "higher is better" in report
