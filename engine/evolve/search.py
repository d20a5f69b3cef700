"""The search loop: Optuna's CMA-ES, asked and told one trial at a time, in a study kept in a database.

- Storage: an SQLAlchemy URL (``sqlite:///OUT_DIR/study.db`` by default; PostgreSQL or any other
  database Optuna supports lets workers on several machines share a study). Workers on one
  machine can share an SQLite file: each waits up to two minutes for the lock.
- Resuming: the study's name is derived from what is searched (not the budget), so re-running the
  same command loads the same study and runs only the trials the budget still allows; finished
  trials are never repeated. A trial interrupted by Ctrl-C (or SIGTERM from the CLI) is marked
  failed and does not count. Budgets count search trials in the whole study (``trials``) and the
  wall time of this run (``minutes``).
- Baselines (``linear``: the plain average of the models; ``ties`` with its declared defaults) are
  enqueued as the first trials of a new study, scored like any trial, and kept out of CMA-ES's
  updates: their placeholder parameters (the centre of the space) do not describe their recipe.
- Each trial: parameters -> recipe (:mod:`engine.evolve.space`) -> in-memory merge into the
  resident model (:mod:`engine.evolve.inmemory`) -> score on the search split. The recipe is kept
  with the trial, so the best one is exactly what is written at the end.
- Finishing: the best trial's recipe is written as ``recipe.yml``, merged with ``run_merge`` into
  ``model/``, and it and the baselines are scored on the held-out split for ``REPORT.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from engine.config import MergeConfig, load_recipe
from engine.errors import MergeError
from engine.evolve.evaluate import Evaluator, Split, load_evaluator
from engine.evolve.inmemory import InMemoryMerger, ResidentCausalLM
from engine.evolve.space import SearchSpace, baseline_recipe, build_space
from engine.evolve.spec import Budget, SearchSpec
from engine.run import MergeOptions, resolve_device, run_merge

log = logging.getLogger(__name__)

BASELINE = "baseline"  # user attribute naming a baseline trial
RECIPE = "recipe"
INTERRUPTED = "interrupted"
OVER_BUDGET = "over_budget"
SQLITE_TIMEOUT_S = 120
RECIPE_FILE = "recipe.yml"
MODEL_DIR = "model"

Clock = Callable[[], float]
TrialOutcome = Literal["complete", "failed"]


@dataclass(frozen=True)
class TrialEvent:
    """What one finished trial reports to a progress callback.

    ``finished`` and ``best`` describe the whole study, so a search resumed after a restart
    (or shared with other workers) reports "trial 12 of 40", not "trial 1".
    """

    number: int
    state: TrialOutcome
    score: float | None
    baseline: str | None
    merge_seconds: float
    eval_seconds: float
    finished: int = 0  # the study's finished trials (baselines included), this one among them
    best: float | None = None  # the study's best score so far


@dataclass(frozen=True)
class TrialRecord:
    """A trial as the report shows it."""

    number: int
    score: float
    baseline: str | None
    params: dict[str, Any]
    recipe: str
    merge_seconds: float
    eval_seconds: float


@dataclass(frozen=True)
class SearchResult:
    """Where a search ended: the best trial, all scored trials, held-out scores and the files written."""

    study_name: str
    storage: str
    direction: str
    metric: str
    best: TrialRecord
    trials: tuple[TrialRecord, ...]
    held_out: dict[str, float]  # "best" and each baseline -> score on the report split
    best_rescored: float  # the best recipe re-scored on the search split
    out_dir: str
    files: tuple[str, ...] = field(default=())
    # with a validation split: each finalist's trial number -> its validation score, best search score first
    validation: dict[int, float] = field(default_factory=dict)

    def finalists(self) -> list[tuple[TrialRecord, float]]:
        """Each finalist's trial and validation score, best search score first (none without validation)."""
        by_number = {r.number: r for r in self.trials}
        return [(by_number[number], value) for number, value in self.validation.items()]


class _CmaEs(optuna.samplers.CmaEsSampler):
    """CMA-ES that leaves baseline trials alone: they are not points it proposed."""

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        if BASELINE in trial.user_attrs:
            return {}
        return super().infer_relative_search_space(study, trial)


def default_storage(out_dir: str) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'study.db'))}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's database storage; SQLite connections wait for the lock instead of failing.

    Raises:
        MergeError: the URL cannot be opened.
    """
    kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        kwargs = {"creator": functools.partial(_sqlite_connection, _sqlite_path(url))}
    last: Exception | None = None
    for attempt in range(5):  # two workers creating the tables at once: one of them retries
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            if sqlite:
                _begin_immediately(storage.engine)
            return storage
        except Exception as exc:  # sqlalchemy's errors, whatever the database
            last = exc
            time.sleep(0.2 * (attempt + 1))
    raise MergeError(
        f"Cannot open the study storage {url}: {last}. Check the URL and that the database is reachable."
    )


def _without_password(url: str) -> str:
    """The storage URL as reports may show it: any password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: show only its scheme
        return url.split(":", 1)[0] + "://..."


def _sqlite_path(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).database or ":memory:"


def _sqlite_connection(path: str) -> sqlite3.Connection:
    """An SQLite connection for a study shared by local workers.

    Write-ahead logging lets workers read while one writes, and with ``synchronous=NORMAL`` a
    commit does not wait for the disk (a power cut can lose the last trials, never corrupt the
    file); each connection waits up to two minutes for the write lock instead of failing.
    """
    # isolation_level=None: the driver opens no transaction of its own; _begin_immediately does.
    connection = sqlite3.connect(
        path, timeout=SQLITE_TIMEOUT_S, check_same_thread=False, isolation_level=None
    )
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _begin_immediately(engine: Any) -> None:
    """Every transaction takes SQLite's write lock when it begins, not at its first write.

    Python's sqlite3 driver begins a transaction only before a write, so optuna's read-then-update
    of a queued trial's state (``SELECT ... FOR UPDATE``, which SQLite ignores) let two workers both
    read the trial as waiting and both run it. Taking the lock first makes that read and its update
    one step; the transactions are short, so workers queue on the lock for milliseconds.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Session:
    """Everything resident during a search: the inputs, the model, the evaluation data."""

    def __init__(self, spec: SearchSpec, *, device: str = "cpu") -> None:
        from transformers import AutoTokenizer

        self.spec = spec
        self.space: SearchSpace = build_space(spec)
        self.device = resolve_device(device)
        references = [spec.base_model, *spec.models]
        self.merger = InMemoryMerger(references, device=self.device)
        template = self.space.recipe(self.space.center())
        self.lm = ResidentCausalLM(
            spec.base_model, dtype=self.merger.output_dtype(template), device=self.device
        )
        tokenizer: Any = AutoTokenizer.from_pretrained(spec.base_model, trust_remote_code=False)
        self.evaluator: Evaluator = load_evaluator(spec.evaluation, tokenizer, seed=spec.seed)

    def load(self, config: MergeConfig) -> float:
        """Merge ``config`` into the resident model; the seconds it took."""
        start = time.perf_counter()
        self.lm.load(self.merger.merge(config))
        return time.perf_counter() - start

    def score(self, config: MergeConfig, split: Split) -> tuple[float, float, float]:
        """(score, merge seconds, evaluation seconds) of ``config`` on one split."""
        merge_s = self.load(config)
        start = time.perf_counter()
        value = self.evaluator.score(self.lm.model, split)
        return value, merge_s, time.perf_counter() - start


def open_study(spec: SearchSpec, storage: optuna.storages.RDBStorage, direction: str) -> optuna.Study:
    """Create the study (enqueueing the baselines) or load it to continue.

    Raises:
        MergeError: a study of that name exists with the other direction.
    """
    name = spec.name_of_study()
    created = False
    try:
        storage.create_new_study([optuna.study.StudyDirection[direction.upper()]], study_name=name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    sampler = _CmaEs(seed=spec.seed, n_startup_trials=0)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    if study.direction.name.lower() != direction:
        raise MergeError(
            f"The study '{name}' in this storage {study.direction.name.lower()}s its score, but this search "
            f"{direction}s it; give another `study_name`."
        )
    center = build_space(spec).center()
    if created:
        # Only the worker that created the study enqueues the baselines, so they are queued once.
        study.set_user_attr("search", spec.model_dump(mode="json"))
        for baseline in spec.baselines:
            study.enqueue_trial(center, user_attrs={BASELINE: baseline})
        return study
    # A baseline whose trial was interrupted is queued again (by each worker that resumes at that moment).
    trials = study.get_trials(deepcopy=False)
    alive = {
        t.user_attrs[BASELINE] for t in trials if BASELINE in t.user_attrs and t.state != TrialState.FAIL
    }
    interrupted = {
        t.user_attrs[BASELINE]
        for t in trials
        if BASELINE in t.user_attrs and t.state == TrialState.FAIL and INTERRUPTED in t.user_attrs
    }
    for baseline in spec.baselines:
        if baseline in interrupted and baseline not in alive:
            study.enqueue_trial(center, user_attrs={BASELINE: baseline})
    return study


def counted_trials(study: optuna.Study, *, before: int | None = None) -> int:
    """Search trials that use up the budget: finished, running, or failed for a reason of their own."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if BASELINE in t.user_attrs or (before is not None and t.number >= before):
            continue
        if t.state == TrialState.RUNNING or _ran_to_an_end(t):
            n += 1
    return n


def finished_trials(study: optuna.Study) -> int:
    """Trials that ran to an end, baselines included."""
    return sum(_ran_to_an_end(t) for t in study.get_trials(deepcopy=False))


def _ran_to_an_end(trial: FrozenTrial) -> bool:
    """Scored, or failed for a reason of its own (not interrupted)."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and INTERRUPTED not in trial.user_attrs
    )


def _best_so_far(study: optuna.Study) -> float | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return float(study.best_value)


def run_trials(
    session: Session,
    study: optuna.Study,
    budget: Budget,
    *,
    clock: Clock = time.monotonic,
    progress: Callable[[TrialEvent], None] | None = None,
) -> int:
    """Ask, merge, score and tell until the budget is spent; returns the number of trials run here."""
    start = clock()
    distributions = session.space.distributions()
    ran = 0

    def waiting() -> bool:
        return any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))

    while True:
        if budget.minutes is not None and clock() - start >= budget.minutes * 60:
            break
        if budget.trials is not None and counted_trials(study) >= budget.trials and not waiting():
            break
        trial = study.ask(distributions)
        baseline = trial.user_attrs.get(BASELINE)
        if (
            baseline is None
            and budget.trials is not None
            and counted_trials(study, before=trial.number) >= budget.trials
        ):
            # another worker took the last trial between our check and our ask
            trial.set_user_attr(OVER_BUDGET, True)
            study.tell(trial, state=TrialState.PRUNED)
            break
        merge_s = eval_s = 0.0
        try:
            config = (
                baseline_recipe(session.spec, baseline) if baseline else session.space.recipe(trial.params)
            )
            trial.set_user_attr(RECIPE, config.to_yaml())
            value, merge_s, eval_s = session.score(config, "search")
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED, True)
            study.tell(trial, state=TrialState.FAIL)
            raise
        except MergeError as exc:
            log.warning("trial %d failed: %s", trial.number, exc)
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            value = math.nan
        except Exception as exc:  # a bug: close the trial, so it does not stay running forever
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            trial.set_user_attr("merge_seconds", merge_s)
            trial.set_user_attr("eval_seconds", eval_s)
            if math.isfinite(value):
                study.tell(trial, value)
            else:
                trial.set_user_attr("error", f"the score is {value}")
                study.tell(trial, state=TrialState.FAIL)
        ran += 1
        state: TrialOutcome = "complete" if math.isfinite(value) else "failed"
        log.info("trial %d (%s): %s", trial.number, baseline or "search", value)
        if progress:
            progress(
                TrialEvent(
                    trial.number,
                    state,
                    value if math.isfinite(value) else None,
                    baseline,
                    merge_s,
                    eval_s,
                    finished=finished_trials(study),
                    best=_best_so_far(study),
                )
            )
    return ran


def scored_trials(study: optuna.Study) -> list[TrialRecord]:
    """Every completed trial, baselines included, in trial order."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        assert t.value is not None
        out.append(
            TrialRecord(
                number=t.number,
                score=float(t.value),
                baseline=t.user_attrs.get(BASELINE),
                params=dict(t.params),
                recipe=str(t.user_attrs.get(RECIPE, "")),
                merge_seconds=float(t.user_attrs.get("merge_seconds", 0.0)),
                eval_seconds=float(t.user_attrs.get("eval_seconds", 0.0)),
            )
        )
    return out


def best_trial(records: Sequence[TrialRecord], direction: str) -> TrialRecord:
    """The best completed trial (baselines compete too); the earliest wins a tie."""
    return ranked_trials(records, direction)[0]


def ranked_trials(records: Sequence[TrialRecord], direction: str) -> list[TrialRecord]:
    """Completed trials from the best search score down; the earlier of a tie first."""
    sign = 1.0 if direction == "minimize" else -1.0
    return sorted(records, key=lambda r: (sign * r.score, r.number))


def choose_final(
    records: list[TrialRecord],
    direction: str,
    finalists: int,
    validate: Callable[[TrialRecord], float] | None,
) -> tuple[TrialRecord, dict[int, float]]:
    """The recipe a search ends with, and each finalist's validation score.

    Without ``validate`` it is the best search score. With it, the ``finalists`` best search
    trials by search score, and each baseline, are scored again on the validation split and
    the best there wins; a tie goes to the better search score. The search score of the best trial is biased
    upward (it was picked for being high on the very items it is measured on); fresh items are
    not. The baselines compete whatever their search score: a search that only fits its split's
    items then loses to the plain recipes it was meant to beat.
    """
    ranked = ranked_trials(records, direction)
    if validate is None:
        return ranked[0], {}
    seen_baselines: set[str] = set()
    searched = 0
    candidates = []
    for record in ranked:
        if record.baseline is None:
            searched += 1
            if searched > finalists:
                continue
        elif record.baseline in seen_baselines:
            continue
        else:
            seen_baselines.add(record.baseline)
        candidates.append(record)
    sign = 1.0 if direction == "minimize" else -1.0
    scores = {record.number: validate(record) for record in candidates}

    def worse_first(item: tuple[int, TrialRecord]) -> tuple[bool, float, int]:
        rank, record = item
        value = scores[record.number]
        return (not math.isfinite(value), sign * value if math.isfinite(value) else 0.0, rank)

    _, chosen = min(enumerate(candidates), key=worse_first)
    return chosen, scores


def finish(
    session: Session,
    study: optuna.Study,
    out_dir: str,
    *,
    storage_url: str,
    device: str = "cpu",
    checkpoint: Callable[[], None] | None = None,
) -> SearchResult:
    """Write the best recipe, its merged model (run_merge) and the report; score the held-out split.

    The best recipe is the best search score, or, with a validation split, the finalist best on
    it (:func:`choose_final`).

    ``checkpoint`` is called between steps and after each tensor of the merge (it may raise to
    stop: a cancelled job then writes nothing more).

    Raises:
        MergeError: no trial has completed, or the merge cannot be written.
    """
    from engine.evolve.report import write_report

    records = scored_trials(study)
    if not records:
        raise MergeError(
            "No trial has completed yet, so there is no best recipe; raise the budget and run again."
        )
    direction = session.evaluator.direction
    check = checkpoint or (lambda: None)
    evaluation = session.spec.evaluation

    def validate(record: TrialRecord) -> float:
        check()
        return session.score(load_recipe(record.recipe, name=f"trial {record.number}"), "validation")[0]

    best, validation = choose_final(
        records, direction, evaluation.finalists, validate if evaluation.validation_size else None
    )
    recipe_path = os.path.join(out_dir, RECIPE_FILE)
    with open(recipe_path, "w", encoding="utf-8") as f:
        f.write(best.recipe)
    config = load_recipe(recipe_path)
    check()
    run_merge(
        config,
        os.path.join(out_dir, MODEL_DIR),
        options=MergeOptions(overwrite=True, device=device),
        progress=lambda done, total, name: check(),
    )

    held_out: dict[str, float] = {}
    check()
    best_rescored, _, _ = session.score(config, "search")
    check()
    held_out["best"] = session.score(config, "report")[0]
    for record in records:
        if record.baseline and record.baseline not in held_out:
            check()
            held_out[record.baseline] = session.score(load_recipe(record.recipe, name="baseline"), "report")[
                0
            ]
    result = SearchResult(
        study_name=study.study_name,
        storage=_without_password(storage_url),
        direction=direction,
        metric=session.evaluator.metric,
        best=best,
        trials=tuple(records),
        held_out=held_out,
        best_rescored=best_rescored,
        out_dir=out_dir,
        validation=validation,
    )
    files = write_report(result, session.space, session.spec)
    return dataclasses.replace(result, files=(recipe_path, os.path.join(out_dir, MODEL_DIR), *files))


def run_search(
    spec: SearchSpec,
    out_dir: str,
    *,
    storage: str | None = None,
    budget: Budget | None = None,
    worker_only: bool = False,
    device: str = "cpu",
    clock: Clock = time.monotonic,
    progress: Callable[[TrialEvent], None] | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> SearchResult | None:
    """Run (or continue) a search and, unless ``worker_only``, write its results to ``out_dir``.

    Args:
        storage: an SQLAlchemy URL; default: the search file's ``storage``, else SQLite in ``out_dir``.
        budget: overrides the search file's budget.
        worker_only: run trials only (for extra workers sharing a study); returns None.
        checkpoint: called once the models are loaded and between the final steps (see
            :func:`finish`); it may raise to stop the search there (a cancel). Between trials,
            ``progress`` is the place for that.

    Raises:
        MergeError: a subclass saying what to fix (models, data, storage, output).
    """
    os.makedirs(out_dir, exist_ok=True)
    url = storage or spec.storage or default_storage(out_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    session = Session(spec, device=device)
    if checkpoint:
        checkpoint()
    study = open_study(spec, open_storage(url), session.evaluator.direction)
    run_trials(session, study, budget or spec.budget, clock=clock, progress=progress)
    if worker_only:
        return None
    return finish(session, study, out_dir, storage_url=url, device=device, checkpoint=checkpoint)
