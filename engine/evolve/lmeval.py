"""Scoring with lm-evaluation-harness tasks: ``kind: lm_eval`` (the ``lm-eval`` extra).

    evaluation:
      kind: lm_eval
      tasks: [my_task]      # lm-eval task (or group) names
      data: ./tasks         # optional: a folder of task YAML files (lm-eval's --include_path)
      num_fewshot: 0        # optional; default: each task's own
      search_size: 64       # documents per task
      report_size: 64

- Finding tasks: names are looked up in ``data`` first, then among lm-eval's own tasks (indexing
  those takes seconds, so it is skipped when the folder defines every task named). lm-eval's own
  tasks download their datasets from the Hugging Face Hub on first use; without the Hub, write a
  task over a local file (``dataset_path: json``, ``dataset_kwargs: {data_files: {test: items.jsonl}}``,
  ``test_split: test``). Relative ``data_files`` are read from the task folder (lm-eval alone
  would read them from the current folder).
- Splits: each task's evaluation documents (its test split, else its validation split) are
  shuffled with the seed; the first ``search_size`` score trials and the next ``report_size`` are
  held out, passed to lm-eval as document indices (its ``samples``), so the two never share a
  document. Few-shot examples are drawn with the seed afresh on every call, so a document's
  prompt is the same in every trial (they come from the task's few-shot split; for a task with
  no training or validation split that is its evaluation split, minus the document itself).
- Score: each task's primary metric (the first it declares, e.g. ``acc``, under its first
  filter), averaged over the tasks (a group counts as its member tasks, one by one). Which way
  is better is the metric's ``higher_is_better``; the tasks of one search must agree on it.
- The model: lm-eval's ``HFLM`` wraps the resident transformers model itself, so each trial's
  merge is scored in memory, never written to disk.

This module imports lm-eval; :mod:`engine.evolve.evaluate` imports it only for ``kind: lm_eval``,
and :func:`engine.evolve.spec.validate_search` reports a missing install first.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
from dataclasses import dataclass
from typing import Any

from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from engine.evolve.errors import EvaluationDataError, SearchFileError
from engine.evolve.evaluate import SPLITS, Direction, Split, split_indices
from engine.evolve.spec import Evaluation

log = logging.getLogger(__name__)

KIND = "lm_eval"


@dataclass(frozen=True)
class TaskSplits:
    """One lm-eval task, its primary metric, and its documents (indices, ascending) in each split."""

    name: str
    task: Any  # lm_eval.api.task.Task
    metric: str
    higher_is_better: bool
    documents: dict[Split, tuple[int, ...]]

    def indices(self, split: Split) -> list[int]:
        return list(self.documents[split])


class QuietHFLM(HFLM):
    """lm-eval's transformers model without its progress bars: a search scores hundreds of times."""

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        return super().generate_until(requests, disable_tqdm=True)


class LmEvalEvaluator:
    """lm-eval tasks with their two splits; call :meth:`score` with a model and a split name."""

    kind = KIND

    def __init__(
        self,
        tasks: tuple[TaskSplits, ...],
        *,
        requested: tuple[str, ...],
        tokenizer: Any,
        batch_size: int,
        seed: int,
    ) -> None:
        self.tasks = tasks
        self.requested = requested
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self._wrapped: tuple[Any, HFLM] | None = None  # (model, lm-eval's wrapper of it)

    @property
    def direction(self) -> Direction:
        return "maximize" if self.tasks[0].higher_is_better else "minimize"

    @property
    def metric(self) -> str:
        """The metric's name as the report shows it, e.g. ``acc (lm-eval: arc_easy)``."""
        metrics = list(dict.fromkeys(t.metric for t in self.tasks))
        names = ", ".join(self.requested)
        if len(self.tasks) == 1:
            return f"{metrics[0]} (lm-eval: {names})"
        over = names if len(self.tasks) == len(self.requested) else f"{names}; {len(self.tasks)} tasks"
        return f"mean {' / '.join(metrics)} (lm-eval: {over})"

    @property
    def splits(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Each split's document indices by task name."""
        return {split: {t.name: t.documents[split] for t in self.tasks} for split in SPLITS}

    def score(self, model: Any, split: Split) -> float:
        """The mean of the tasks' primary metrics on one split's documents (see the module docstring).

        Raises:
            EvaluationDataError: lm-eval's results lack a task's metric.
        """
        for t in self.tasks:  # the sampler advances as it draws: reset it, for the same prompts every call
            t.task.set_fewshot_seed(seed=self.seed)
        results = evaluate(
            lm=self._lm(model),
            task_dict={"tasks": {t.name: t.task for t in self.tasks}},
            samples={t.name: t.indices(split) for t in self.tasks},
            bootstrap_iters=0,
            log_samples=False,
        )
        if results is None:  # only rank 0 gets results; a search is one process
            raise EvaluationDataError(
                "lm-eval tasks", "lm-eval returned no results (is this a distributed run?)"
            )
        values = [_metric_value(results["results"].get(t.name, {}), t) for t in self.tasks]
        return sum(values) / len(values)

    def _lm(self, model: Any) -> HFLM:
        """lm-eval's wrapper of ``model`` (the resident model: trials change its weights in place)."""
        if self._wrapped is None or self._wrapped[0] is not model:
            self._wrapped = (
                model,
                QuietHFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size),
            )
        return self._wrapped[1]


def load_lm_eval(evaluation: Evaluation, tokenizer: Any, *, seed: int) -> LmEvalEvaluator:
    """Load the tasks (and their datasets) and split each task's documents into search and report parts.

    Args:
        evaluation: a validated ``kind: lm_eval`` section (``data`` resolved to an absolute folder).
        tokenizer: the base model's tokenizer, used by lm-eval's model wrapper.
        seed: shuffles each task's documents before the split and seeds few-shot sampling.

    Raises:
        SearchFileError: no tasks are named.
        EvaluationDataError: a task is unknown, cannot be loaded (e.g. its dataset is on an
            unreachable Hub), has too few documents, or the tasks disagree on which way is better.
    """
    names = tuple(evaluation.tasks or ())
    if not names:
        raise SearchFileError.single("evaluation.tasks", "is required for kind: lm_eval")
    folder = evaluation.data
    where = folder or "lm-eval tasks"
    manager = _task_manager(names, folder)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            places = f"in {folder} or among lm-eval's own tasks" if folder else "among lm-eval's own tasks"
            raise EvaluationDataError(where, f"no lm-eval task named '{name}' {places}.{hint}")
    # lm-eval reads a task's relative data_files from the current folder: make it the task folder
    with contextlib.chdir(folder) if folder else contextlib.nullcontext():
        try:
            loaded = manager.load(list(names))
        except Exception as exc:  # lm-eval and datasets raise many kinds: YAML, Jinja, I/O, Hub access
            raise EvaluationDataError(
                where,
                f"lm-eval could not load {', '.join(names)}: {type(exc).__name__}: {exc}. lm-eval's own tasks "
                "download their datasets from the Hugging Face Hub; without it, give `data`: a folder of "
                "task YAML files over local files (dataset_path: json, dataset_kwargs.data_files)",
            ) from exc
    tasks = tuple(_split(name, task, evaluation, seed) for name, task in loaded["tasks"].items())
    if not tasks:
        raise EvaluationDataError(where, f"{', '.join(names)} holds no lm-eval task to score")
    directions = {t.higher_is_better for t in tasks}
    if len(directions) > 1:
        higher = ", ".join(f"{t.name} ({t.metric})" for t in tasks if t.higher_is_better)
        lower = ", ".join(f"{t.name} ({t.metric})" for t in tasks if not t.higher_is_better)
        raise EvaluationDataError(
            where,
            f"the tasks' metrics disagree on which way is better (higher: {higher}; lower: {lower}); "
            "search them separately",
        )
    return LmEvalEvaluator(
        tasks, requested=names, tokenizer=tokenizer, batch_size=evaluation.batch_size, seed=seed
    )


def _task_manager(names: tuple[str, ...], folder: str | None) -> TaskManager:
    """The task index: the folder alone when it defines every task named, else lm-eval's own too."""
    if folder:
        local = TaskManager(include_path=folder, include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local
        return TaskManager(include_path=folder, include_defaults=True)
    return TaskManager()


def _split(name: str, task: Any, evaluation: Evaluation, seed: int) -> TaskSplits:
    """One task's primary metric, few-shot count and disjoint search/report documents."""
    where = f"lm-eval task {name}"
    indices = split_indices(
        len(task.eval_docs),
        evaluation,
        seed,
        where=where,
        what="evaluation documents",
        fix="lower the sizes (they count documents per task)",
    )
    better = dict(task.higher_is_better() or {})
    if not better:
        raise EvaluationDataError(where, "declares no metric to score (give it a metric_list)")
    metric = next(iter(better))
    _set_fewshot(name, task, evaluation.num_fewshot)
    # lm-eval maps its i-th selected document back to samples[i]: the indices must ascend
    return TaskSplits(
        name=name,
        task=task,
        metric=metric,
        higher_is_better=bool(better[metric]),
        documents={split: tuple(sorted(docs)) for split, docs in indices.items()},
    )


def _set_fewshot(name: str, task: Any, num_fewshot: int | None) -> None:
    """As lm-eval's ``simple_evaluate``: a task that fixes 0 keeps it; unset means 0."""
    own = task.get_config("num_fewshot")
    if num_fewshot is not None and own != 0:
        task.set_config(key="num_fewshot", value=num_fewshot)
    elif num_fewshot is not None and num_fewshot != 0:
        log.warning("%s fixes num_fewshot at 0; ignoring num_fewshot: %d", name, num_fewshot)
    elif own is None:
        task.set_config(key="num_fewshot", value=0)


def _metric_value(row: dict[str, Any], task: TaskSplits) -> float:
    """The task's primary metric under its first filter (lm-eval's keys are ``metric,filter``)."""
    for key, value in row.items():
        metric, _, filter_name = key.partition(",")
        if metric == task.metric and filter_name and isinstance(value, int | float):
            return float(value)
    raise EvaluationDataError(
        f"lm-eval task {task.name}", f"lm-eval's results have no '{task.metric}' (got: {', '.join(row)})"
    )
