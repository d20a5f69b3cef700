"""The search end to end on tiny models: files written, re-scoring, resuming, shared studies."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import Family
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import load_recipe, run_merge
from engine.evolve import InMemoryMerger, TrialEvent, load_search, run_search
from engine.evolve.evaluate import load_evaluator
from engine.evolve.search import (
    BASELINE,
    RECIPE,
    Session,
    TrialRecord,
    choose_final,
    default_storage,
    open_storage,
    ranked_trials,
)
from engine.evolve.spec import Budget, SearchSpec
from mergebot.cli import main as mergebot_main

ROOT = Path(__file__).resolve().parents[2]


def trials_of(spec: SearchSpec, out: Path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(default_storage(str(out)))
    return optuna.load_study(study_name=spec.name_of_study(), storage=storage).get_trials()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def finished(
    llama_family: Family, search_file_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SearchSpec, Path, Any]:
    """One search, shared by the tests that only read what it wrote."""
    folder = tmp_path_factory.mktemp("evolve-search")
    spec = load_search(search_file_factory(folder, llama_family))
    out = folder / "out"
    result = run_search(spec, str(out))
    return spec, out, result


def test_search_writes_recipe_model_report_and_plot(finished: tuple[SearchSpec, Path, Any]) -> None:
    spec, out, result = finished
    assert {p.name for p in out.iterdir()} >= {
        "recipe.yml",
        "model",
        "REPORT.md",
        "score_vs_trial.png",
        "study.db",
    }
    recipe = load_recipe(out / "recipe.yml")
    assert recipe.merge_method in ("dare_ties", "linear", "ties")
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    assert (out / "score_vs_trial.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "REPORT.md").read_text()
    assert "| baseline: linear |" in report and "| baseline: ties |" in report
    assert any(
        line.startswith("| best (`recipe.yml`)") and f"| {result.best.number} |" in line
        for line in report.splitlines()
    )
    assert "weight ft0" in report and "density ft1" in report
    trials = [t for t in trials_of(spec, out) if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.user_attrs.get(BASELINE) for t in trials[:2]] == ["linear", "ties"]  # enqueued first
    assert len(trials) == 2 + 3
    assert set(result.held_out) == {"best", "linear", "ties"}
    best = min(trials, key=lambda t: (t.value, t.number))
    assert result.best.number == best.number and result.best.score == best.value


def test_the_best_recipe_rescores_as_reported(finished: tuple[SearchSpec, Path, Any]) -> None:
    spec, out, result = finished
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.bfloat16)
    model.eval()
    evaluator = load_evaluator(spec.evaluation, AutoTokenizer.from_pretrained(out / "model"), seed=spec.seed)
    assert evaluator.score(model, "search") == result.best.score
    assert result.best_rescored == result.best.score
    assert evaluator.score(model, "report") == result.held_out["best"]


def test_a_validation_split_chooses_among_the_finalists(
    finished: tuple[SearchSpec, Path, Any], tmp_path: Path
) -> None:
    spec, out, result = finished
    evaluation = spec.evaluation.model_copy(update={"validation_size": 6, "finalists": 3})
    validated = spec.model_copy(update={"evaluation": evaluation})
    assert validated.name_of_study() == spec.name_of_study()  # validation only re-picks: the same study
    target = tmp_path / "validated"
    again = run_search(validated, str(target), storage=default_storage(str(out)))
    assert again is not None and len(again.trials) == len(result.trials)  # the budget was spent: no trial ran

    ranked = ranked_trials(list(result.trials), "minimize")
    searched = [r.number for r in ranked if r.baseline is None][:3]
    finalists = [r.number for r in ranked if r.baseline is not None or r.number in searched]
    assert list(again.validation) == finalists and len(finalists) == 5  # the 3 best trials and 2 baselines
    chosen = min(finalists, key=lambda n: (again.validation[n], finalists.index(n)))
    assert again.best.number == chosen and (target / "recipe.yml").read_text() == again.best.recipe
    model = AutoModelForCausalLM.from_pretrained(target / "model", dtype=torch.bfloat16)
    model.eval()
    evaluator = load_evaluator(evaluation, AutoTokenizer.from_pretrained(target / "model"), seed=spec.seed)
    assert evaluator.score(model, "validation") == again.validation[chosen]
    assert evaluator.score(model, "report") == again.held_out["best"]
    report = (target / "REPORT.md").read_text()
    assert "validation split 6" in report and "## Choosing the final recipe" in report
    assert sum("**chosen**" in line for line in report.splitlines()) == 1


def test_the_cli_names_the_validation_pick(
    finished: tuple[SearchSpec, Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, out, _ = finished
    data = spec.model_dump(mode="json", exclude_defaults=True)
    data["evaluation"].update(validation_size=6, finalists=3)
    path = tmp_path / "validated.yml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert (
        mergebot_main(["evolve", str(path), str(tmp_path / "out"), "--storage", default_storage(str(out))])
        == 0
    )
    printed = capsys.readouterr().out
    assert "on the validation split (the best of 5 finalists)" in printed and "held out" in printed


def record(number: int, score: float, baseline: str | None = None) -> TrialRecord:
    return TrialRecord(number, score, baseline, {}, f"trial {number}", 0.0, 0.0)


def test_choose_final_takes_the_finalist_best_on_validation() -> None:
    records = [
        record(0, 0.5, "linear"),
        record(1, 0.9),
        record(2, 0.8),
        record(3, 0.7),
        record(4, 0.9),
        record(5, 0.95, "ties"),
    ]
    assert choose_final(records, "maximize", 3, None) == (records[5], {})
    assert choose_final(records[:5], "maximize", 3, None) == (records[1], {})  # the earlier of a tie
    held = {5: 0.1, 1: 0.6, 4: 0.7, 2: 0.7, 3: 1.0, 0: 0.5}
    best, scores = choose_final(records, "maximize", 3, lambda r: held[r.number])
    # the 3 best search trials and every baseline, in search order; trial 3 is not a finalist
    assert list(scores) == [5, 1, 4, 2, 0] and scores[0] == 0.5
    assert best.number == 4  # a validation tie goes to the better search rank
    best, _ = choose_final(records, "maximize", 1, lambda r: {**held, 0: 0.9}[r.number])
    assert best.number == 0  # a baseline far down the search ranking still competes, and wins here
    best, _ = choose_final(
        records, "maximize", 4, lambda r: math.nan if r.number == 3 else {**held, 0: 0.0}[r.number]
    )
    assert best.number == 4  # a failed validation score never wins
    lower = [record(0, 3.0), record(1, 2.0), record(2, 2.5)]
    best, scores = choose_final(lower, "minimize", 2, lambda r: {1: 9.0, 2: 4.0}[r.number])
    assert best.number == 2 and list(scores) == [1, 2]


def test_each_trial_merge_equals_run_merge_of_its_reported_recipe(
    finished: tuple[SearchSpec, Path, Any], tmp_path: Path
) -> None:
    spec, out, result = finished
    merger = InMemoryMerger([spec.base_model, *spec.models])
    best = dict(merger.merge(load_recipe(out / "recipe.yml")))
    on_disk = weights(out / "model")
    assert best.keys() == on_disk.keys()
    assert all(torch.equal(best[n].view(torch.uint8), on_disk[n].view(torch.uint8)) for n in best)
    for trial in trials_of(spec, out):
        if trial.user_attrs.get(BASELINE) or trial.number == result.best.number:
            continue
        config = load_recipe(trial.user_attrs[RECIPE], name="trial")
        target = tmp_path / f"trial-{trial.number}"
        run_merge(config, target)
        written = weights(target)
        for name, tensor in merger.merge(config):
            assert torch.equal(tensor.view(torch.uint8), written[name].view(torch.uint8)), (
                trial.number,
                name,
            )


def test_rerunning_continues_the_study_without_repeating_trials(
    llama_family: Family, write_search: Any, tmp_path: Path
) -> None:
    spec = load_search(write_search(llama_family, budget={"trials": 3}))
    out = tmp_path / "out"
    first: list[TrialEvent] = []
    run_search(spec, str(out), progress=first.append)
    assert [e.baseline for e in first] == ["linear", "ties", None, None, None]
    before = {t.number: (t.params, t.value, t.datetime_complete) for t in trials_of(spec, out)}

    second: list[TrialEvent] = []
    run_search(spec, str(out), budget=Budget(trials=5), progress=second.append)
    assert [(e.number, e.baseline) for e in second] == [(5, None), (6, None)]  # only the two new ones
    assert [e.finished for e in first] == [1, 2, 3, 4, 5]
    assert [e.finished for e in second] == [6, 7]  # counted over the study, not this run
    scores = [e.score for e in first + second if e.score is not None]
    best = min(scores) if spec.evaluation.kind == "perplexity" else max(scores)
    assert second[-1].best == best
    after = trials_of(spec, out)
    assert len(after) == 7 and sum(BASELINE not in t.user_attrs for t in after) == 5
    for t in after:
        if t.number in before:
            assert (t.params, t.value, t.datetime_complete) == before[t.number]  # not re-run

    third: list[TrialEvent] = []
    run_search(spec, str(out), budget=Budget(trials=5), progress=third.append)
    assert third == []  # budget spent: nothing runs, the results are written again


def test_an_interrupted_trial_is_not_counted_and_the_rerun_completes_the_budget(
    llama_family: Family, write_search: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_search(write_search(llama_family, budget={"trials": 3}, baselines=[]))
    out = tmp_path / "out"
    calls = {"n": 0}
    real = Session.score

    def interrupt_second(self: Session, config: Any, split: Any) -> tuple[float, float, float]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, config, split)

    monkeypatch.setattr(Session, "score", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, str(out))
    monkeypatch.setattr(Session, "score", real)
    states = [t.state for t in trials_of(spec, out)]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    run_search(spec, str(out))
    trials = trials_of(spec, out)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 3
    assert len(trials) == 4


def test_a_sqlite_study_transaction_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    # optuna reads a queued trial's state, then marks it running; SQLite ignores SELECT ... FOR
    # UPDATE, so unless the read already holds the write lock, two workers can both take the trial.
    url = default_storage(str(tmp_path))
    storage = open_storage(url)
    with storage.engine.connect() as connection, connection.begin():
        connection.exec_driver_sql("SELECT count(*) FROM trials").all()
        other = sqlite3.connect(str(tmp_path / "study.db"), timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
    other = sqlite3.connect(str(tmp_path / "study.db"), timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the lock goes with the transaction
    other.execute("ROLLBACK")
    other.close()


def test_two_workers_share_one_sqlite_study(llama_family: Family, write_search: Any, tmp_path: Path) -> None:
    path = write_search(llama_family, budget={"trials": 8})
    out = tmp_path / "out"
    # Each worker sets up (models, data, storage), then waits for the other, so both run trials at once.
    runner = textwrap.dedent(
        """
        import os, sys, time
        import engine.evolve.search as search
        from mergebot.cli import main
        me, other = sys.argv[1], sys.argv[2]
        real_open_study = search.open_study

        def open_study_together(*args, **kwargs):
            open(me, "w").close()
            while not os.path.exists(other):
                time.sleep(0.01)
            return real_open_study(*args, **kwargs)

        search.open_study = open_study_together
        sys.exit(main(sys.argv[3:]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                runner,
                str(tmp_path / f"ready{i}"),
                str(tmp_path / f"ready{1 - i}"),
                "evolve",
                str(path),
                str(out),
                "--worker",
                "--threads",
                "1",  # two workers on two cores: one thread each, or they fight over the cores
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr
    ran = [[line for line in stdout.splitlines() if line.startswith("trial")] for stdout, _ in outputs]
    assert all(ran), ran  # both workers ran trials
    assert not (out / "REPORT.md").exists()  # workers leave the results to the last run

    spec = load_search(path)
    trials = trials_of(spec, out)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sum(BASELINE not in t.user_attrs for t in complete) == 8
    assert sorted(t.user_attrs[BASELINE] for t in complete if BASELINE in t.user_attrs) == ["linear", "ties"]
    # no trial ran twice (a trial asked for after the budget was spent is closed as pruned, unrun)
    assert len(ran[0]) + len(ran[1]) == sum(t.state != optuna.trial.TrialState.PRUNED for t in trials)

    assert mergebot_main(["evolve", str(path), str(out)]) == 0  # budget spent: only the results
    assert (out / "REPORT.md").exists()
    assert len(trials_of(spec, out)) == len(trials)


def test_cli_reports_a_bad_search_file_and_exits_1(
    llama_family: Family, write_search: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_search(llama_family, parameters={"density": {"max": 2}})
    assert mergebot_main(["evolve", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Invalid search file") and "parameters.density.max (line" in err
    assert mergebot_main(["evolve", "--help"]) == 0
    assert mergebot_main(["evolve"]) == 2


def test_a_trial_whose_recipe_cannot_merge_fails_and_the_search_goes_on(
    llama_family: Family, write_search: Any, tmp_path: Path
) -> None:
    # DELLA needs density ± epsilon inside (0, 1): every point of this space breaks that rule
    spec = load_search(
        write_search(
            llama_family,
            method="della",
            parameters={
                "weight": {"min": 0.5, "max": 1.0},
                "density": {"min": 0.3, "max": 0.5},
                "epsilon": {"min": 0.6, "max": 0.7},
            },
            budget={"trials": 2},
        )
    )
    events: list[TrialEvent] = []
    result = run_search(spec, str(tmp_path / "out"), progress=events.append)
    assert [(e.baseline, e.state) for e in events] == [
        ("linear", "complete"),
        ("ties", "complete"),
        (None, "failed"),
        (None, "failed"),
    ]
    failed = [t for t in trials_of(spec, tmp_path / "out") if t.state == optuna.trial.TrialState.FAIL]
    assert all("della needs density ± epsilon inside (0, 1)" in t.user_attrs["error"] for t in failed)
    assert result is not None and result.best.baseline in ("linear", "ties")  # the best may be a baseline
    assert load_recipe(tmp_path / "out" / "recipe.yml").merge_method == result.best.baseline


def test_a_checkpoint_stops_the_final_merge_and_leaves_no_model(
    llama_family: Family, write_search: Any, tmp_path: Path
) -> None:
    """A cancel after the trials (during the best recipe's merge) raises there; no half model is left."""
    spec = load_search(write_search(llama_family, budget={"trials": 1}))
    out = tmp_path / "out"
    calls: list[int] = []

    class Stop(Exception):
        pass

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 4:  # loaded, before the merge, first tensor merged: the second tensor stops it
            raise Stop

    with pytest.raises(Stop):
        run_search(spec, str(out), checkpoint=checkpoint)
    assert not (out / "model").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".model.partial")]
    calls.clear()
    result = run_search(spec, str(out))  # the study is complete: only the final steps run again
    assert result is not None and (out / "model" / "config.json").exists()
