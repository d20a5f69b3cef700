"""The ``evolve`` job kind: a search file -> a CMA-ES search over merge coefficients -> the best merge,
published with a card that shows the search history.

The search file is ``mergebot evolve``'s (:mod:`engine.evolve.spec`), with the bot's conventions,
because the bot reads the Hub, not a disk:

- ``base_model`` and ``models`` are Hub repo ids (``org/name`` or ``org/name@revision``);
- ``evaluation.data`` is a file in a Hub repo: ``hf://datasets/org/name/path.jsonl`` for a dataset
  repo, ``hf://org/name/path.txt`` for a model repo, optionally ``@revision`` after the name;
- ``evaluation.kind`` is ``perplexity``, ``exact_match`` or ``loglikelihood`` (not ``lm_eval``,
  whose tasks may run code and fetch data from elsewhere);
- ``budget.trials`` is required, at most the bot's ``max_evolve_trials``; ``budget.minutes`` fits
  in the bot's time limit per job, and every other number has a ceiling (:data:`SEARCH_BOUNDS`);
- the data file is at most ``max_evolve_data_bytes`` (its size is read from the repo's file
  metadata before anything is downloaded);
- models and data are read with the requester's rights (:mod:`bot.rights`);
- ``storage`` is refused: each job keeps its study in its own work folder (a database URL written
  in a comment is never opened).

Preflight (before the job is queued) checks all of it: the engine's own validation of the file,
then the Hub facts of the models (exist, agree, licences; every repo pinned to a commit) and of the
data file. The worker downloads the pinned models (safetensors, config and tokenizer files: no
code, no pickles) and the data into ``work/evolve-<job>/``, where the study lives, so a search
interrupted by a restart continues where it stopped; each finished trial updates the status
comment (trial i/N, best score) and is a point where a cancel takes effect.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from bot.cards import SearchHistory, TrialRow
from bot.errors import JobInterrupted, PreflightError
from bot.hub import Hub, RepoFacts
from bot.jobs import Job
from bot.licenses import LicenseVerdict
from bot.markdown import code_span
from bot.rights import ANONYMOUS, Rights, check_rights
from bot.settings import Settings
from bot.worker import StatusComment, _walk_models, commit_description, hub_repo, job_marker, preflight
from engine import MergeError
from engine.verify import check_loads

if TYPE_CHECKING:  # engine.evolve imports optuna and transformers: only when a search runs
    from bot.worker import Worker
    from engine.evolve import SearchResult, SearchSpec, TrialEvent

log = logging.getLogger(__name__)

DATA_FORMS = "`hf://datasets/org/name/path.jsonl` (a dataset repo) or `hf://org/name/path.txt` (a model repo)"
_DATA_RE = re.compile(
    r"^hf://(?:(?P<kind>datasets|models)/)?"
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w.-]+))?/(?P<path>[^@]+)$"
)
MODEL_FILES = ("*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken")
PLOT_FILE = "score_vs_trial.png"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BOT_EVALUATIONS = ("perplexity", "exact_match", "loglikelihood")
TOP_TRIALS = 10
MAX_MODELS = 8  # a search downloads every model it names
# The ceiling of each number in a search file's `evaluation` (the bot's policy; the engine checks the floors).
SEARCH_BOUNDS: tuple[tuple[str, int], ...] = (
    ("search_size", 1000),
    ("report_size", 1000),
    ("validation_size", 1000),
    ("finalists", 10),
    ("block_size", 2048),
    ("max_new_tokens", 256),
    ("batch_size", 32),
)


@dataclass(frozen=True)
class SearchLimits:
    """What one search may ask for: trials, minutes (None: no limit), and the data file's bytes."""

    trials: int
    minutes: float | None
    data_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> SearchLimits:
        return cls(settings.max_evolve_trials, settings.job_timeout_minutes, settings.max_evolve_data_bytes)


@dataclass(frozen=True)
class DataRef:
    """A file in a Hub repo, as a search file names its evaluation data."""

    repo_type: Literal["model", "dataset"]
    repo_id: str
    revision: str | None
    path: str

    def __str__(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{kind}{self.repo_id}{rev}/{self.path}"


def parse_data_ref(text: object) -> DataRef:
    """Read ``evaluation.data``.

    Raises:
        PreflightError: it is not a file in a Hub repo written as the bot expects.
    """
    match = _DATA_RE.match(text) if isinstance(text, str) else None
    path = match.group("path") if match else ""
    if match is None or any(part in ("", ".", "..") for part in path.split("/")):
        raise PreflightError(
            f"`evaluation.data` must be a file in a Hub repo, written {DATA_FORMS} "
            f"(optionally `@revision` after the repo name); got {code_span(str(text))}."
        )
    kind: Literal["model", "dataset"] = "dataset" if match.group("kind") == "datasets" else "model"
    return DataRef(kind, match.group("repo"), match.group("rev"), path)


@dataclass(frozen=True)
class SearchPreflight:
    """A search file checked against the Hub, every repo pinned to a commit."""

    search_yaml: str  # models as `org/name@sha`, data as `hf://…@sha/path`
    facts: Mapping[str, RepoFacts]
    verdict: LicenseVerdict
    bytes_to_write: int
    trials: int
    baselines: int

    def summary(self) -> str:
        return (
            f"{self.trials} search trials after {self.baselines} baseline trial(s), "
            f"about {self.bytes_to_write / 1e6:.1f} MB to write"
        )


def _search_file_error(location: str, message: str) -> MergeError:
    from engine.evolve.errors import SearchFileError

    return SearchFileError.single(location, message)


def spec_base(data: Mapping[str, Any]) -> str:
    return str(data["base_model"])


def model_refs(data: Mapping[str, Any]) -> list[str]:
    """The base and the models a search file names, base first, each once."""
    refs = [data.get("base_model"), *(data.get("models") or [])]
    return list(dict.fromkeys(r for r in refs if isinstance(r, str)))


def _with_models(data: dict[str, Any], mapping: Callable[[str], str]) -> dict[str, Any]:
    out = dict(data)
    if isinstance(out.get("base_model"), str):
        out["base_model"] = mapping(out["base_model"])
    if isinstance(out.get("models"), list):
        out["models"] = [mapping(m) if isinstance(m, str) else m for m in out["models"]]
    return out


def check_search_file(text: str, *, limits: SearchLimits) -> tuple[dict[str, Any], SearchSpec, DataRef]:
    """The search file against the engine's rules and the bot's conventions (no Hub access).

    Returns:
        The parsed file, the validated spec (its models are the Hub ids), and the data reference.

    Raises:
        engine.evolve.SearchFileError: what is wrong with the file, with locations.
        PreflightError: a model is not a Hub id, or the data is not a file in a Hub repo.
    """
    from engine.evolve.spec import parse_search, validate_search

    max_trials = limits.trials
    data, lines = parse_search(text)
    if "storage" in data:
        raise _search_file_error("storage", "the bot keeps each search's study itself; remove `storage`")
    budget = data.get("budget")
    trials = budget.get("trials") if isinstance(budget, dict) else None
    if isinstance(trials, int) and trials > max_trials:
        raise _search_file_error("budget.trials", f"this bot runs at most {max_trials} trials per search")
    if not isinstance(trials, int) or isinstance(trials, bool):
        raise _search_file_error("budget.trials", f"give the number of trials (at most {max_trials})")
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and evaluation.get("kind") not in BOT_EVALUATIONS:
        raise _search_file_error(
            "evaluation.kind",
            f"the bot scores with {', '.join(BOT_EVALUATIONS)} on a file in a Hub repo "
            "(lm-eval tasks can run code and fetch data: run those with `mergebot evolve` yourself)",
        )
    data_ref = parse_data_ref(evaluation.get("data") if isinstance(evaluation, dict) else None)
    for ref in model_refs(data):
        hub_repo(ref)
    spec = validate_search(data, lines=lines, on_disk=False)  # nothing is downloaded yet
    _check_bounds(spec, limits)
    return data, spec, data_ref


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n / 1e3:.1f} kB"


def _check_bounds(spec: SearchSpec, limits: SearchLimits) -> None:
    """Every number of a validated search file against the bot's ceilings, all problems at once.

    Raises:
        engine.evolve.SearchFileError: a number is above its ceiling.
    """
    from engine.evolve.errors import SearchFileError, SearchProblem

    problems = [
        SearchProblem(f"evaluation.{field}", f"this bot allows at most {ceiling}")
        for field, ceiling in SEARCH_BOUNDS
        if (value := getattr(spec.evaluation, field)) is not None and value > ceiling
    ]
    if len({spec.base_model, *spec.models}) > MAX_MODELS:
        problems.append(SearchProblem("models", f"this bot searches over at most {MAX_MODELS} models"))
    minutes = spec.budget.minutes
    if minutes is not None and limits.minutes is not None and minutes > limits.minutes:
        problems.append(SearchProblem("budget.minutes", f"this bot stops any job after {limits.minutes:g} minutes"))
    if problems:
        raise SearchFileError(problems)


def preflight_search(
    hub: Hub,
    text: str,
    *,
    accept_license: bool,
    name: str,
    endpoint: str,
    token: str,
    limits: SearchLimits,
    rights: Rights = ANONYMOUS,
    private: bool = False,
) -> SearchPreflight:
    """Validate a search file and check its models and data on the Hub; pin every repo to a commit.

    Models and data are read, and judged, with ``rights`` (see :func:`bot.worker.preflight`).

    Raises:
        engine.MergeError (SearchFileError, RecipeError): the file is invalid. PreflightError: a
        repo or the data file cannot be read, is too large, or the models disagree.
        AccessRefused: the requester's rights do not allow it. LicenseRefused: licences.
    """
    data, spec, data_ref = check_search_file(text, limits=limits)
    refs = model_refs(data)
    recipe: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in refs],
    }
    if spec.dtype is not None:
        recipe["dtype"] = spec.dtype
    pre = preflight(
        hub,
        yaml.safe_dump(recipe, sort_keys=False),
        accept_license=accept_license,
        name=name,
        endpoint=endpoint,
        token=token,
        rights=rights,
        private=private,
    )
    reader = rights.reader(hub)
    pins = {ref: f"{hub_repo(ref)[0]}@{pre.facts[hub_repo(ref)[0]].sha}" for ref in refs}
    base_repo = hub_repo(spec_base(data))[0]
    problems: list[str] = []  # both Hub checks below, reported together
    base_sha = pre.facts[base_repo].sha
    if not any(reader.has_file(base_repo, file, revision=base_sha) for file in TOKENIZER_FILES):
        problems.append(
            f"`{base_repo}` has no tokenizer ({' or '.join(TOKENIZER_FILES)}); the search scores "
            "each merge with the base model's tokenizer."
        )
    sha = ""
    try:
        found = reader.file_facts(
            data_ref.repo_id, data_ref.path, repo_type=data_ref.repo_type, revision=data_ref.revision
        )
    except PreflightError as exc:
        problems.append(f"The evaluation data cannot be read: {exc}")
    else:
        sha = found.sha
        if found.size is not None and found.size > limits.data_bytes:
            problems.append(
                f"The evaluation data is {_size(found.size)}, above this bot's limit of "
                f"{_size(limits.data_bytes)}; use a smaller file."
            )
        shown = f"{'datasets/' if data_ref.repo_type == 'dataset' else ''}{data_ref.repo_id}"
        check_rights([RepoFacts(shown, sha, gated=found.gated, private=found.private)], rights, private=private)
    if problems:
        raise PreflightError("\n".join(problems))
    pinned = _with_models(data, lambda ref: pins.get(ref, ref))
    pinned["evaluation"] = {**data["evaluation"], "data": str(dataclasses.replace(data_ref, revision=sha))}
    assert spec.budget.trials is not None
    return SearchPreflight(
        search_yaml=yaml.safe_dump(pinned, sort_keys=False),
        facts=pre.facts,
        verdict=pre.verdict,
        bytes_to_write=pre.bytes_to_write,  # one merged model, whichever recipe wins
        trials=spec.budget.trials,
        baselines=len(spec.baselines),
    )


def searched_dimensions(spec: SearchSpec) -> list[str]:
    """Labels of what a search varies ("weight ft-math", "density ft-code g1", ...)."""
    from engine.evolve import build_space

    space = build_space(spec)
    return [space.label(d) for d in space.dimensions]


# -- the job ------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def search_history(
    result: SearchResult, spec: SearchSpec, evaluation: str, plot: str | None
) -> SearchHistory:
    """The card's view of a finished search (pure)."""
    from engine.evolve import build_space
    from engine.evolve.search import ranked_trials

    space = build_space(spec)
    ranked = ranked_trials(result.trials, result.direction)[:TOP_TRIALS]
    rows = []
    for rank, record in enumerate(ranked, start=1):
        if record.baseline is not None:
            cells = (f"baseline: {record.baseline}", *[""] * (len(space.dimensions) - 1))
        else:
            cells = tuple(_fmt(float(record.params[d.key])) for d in space.dimensions)
        rows.append(TrialRow(rank, record.number, _fmt(record.score), cells))
    held = [("best (this model)", _fmt(result.best.score), _fmt(result.held_out.get("best")))]
    for record in result.trials:
        if record.baseline is not None and all(f"baseline: {record.baseline}" != h[0] for h in held):
            held.append(
                (
                    f"baseline: {record.baseline}",
                    _fmt(record.score),
                    _fmt(result.held_out.get(record.baseline)),
                )
            )
    return SearchHistory(
        method=spec.method,
        metric=result.metric,
        better="lower" if result.direction == "minimize" else "higher",
        evaluation=f"{spec.evaluation.kind} on `{evaluation}`",
        searched=sum(1 for r in result.trials if r.baseline is None),
        baselines=sum(1 for r in result.trials if r.baseline is not None),
        columns=tuple(space.label(d) for d in space.dimensions),
        rows=tuple(rows),
        held_out=tuple(held),
        best_trial=result.best.number,
        best_baseline=result.best.baseline,
        plot=plot,
        validation=tuple(_finalist_rows(result)),
    )


def _finalist_rows(result: SearchResult) -> list[tuple[str, str, str]]:
    rows = []
    for record, value in result.finalists():
        label = f"baseline: {record.baseline}" if record.baseline else f"trial {record.number}"
        if record.number == result.best.number:
            label += " (this model)"
        rows.append((label, _fmt(record.score), _fmt(value)))
    return rows


def run_evolve(worker: Worker, job: Job, status: StatusComment, publisher: Hub) -> str:
    """Download, search, merge the best recipe, publish it with its history; returns the commit.

    The work folder is kept when the bot stops mid-search (the study continues on the next run)
    and removed once the job has ended, however it ended.
    """
    work = worker.settings.work_dir / f"evolve-{job.id}"
    interrupted = False
    try:
        return _run(worker, job, status, publisher, work)
    except JobInterrupted:
        interrupted = True
        raise
    finally:
        if not interrupted:
            shutil.rmtree(work, ignore_errors=True)


def _run(worker: Worker, job: Job, status: StatusComment, publisher: Hub, work: Path) -> str:
    from engine.evolve import run_search, validate_search

    spec_yaml = job.spec.search_yaml or ""
    data: dict[str, Any] = yaml.safe_load(spec_yaml)
    data_ref = parse_data_ref(data["evaluation"]["data"])
    hub = worker.rights(job).reader(worker.hub)  # inputs are read with the requester's rights
    status.show(f"⚙️ Job `{job.id}` is running: downloading the models…")
    local: dict[str, str] = {}
    for ref in model_refs(data):
        worker.checkpoint(job)
        repo_id, revision = hub_repo(ref)
        assert revision is not None  # preflight pinned it
        local[ref] = str(hub.download_model(repo_id, revision, work / "models" / repo_id))
    assert data_ref.revision is not None
    data_file = hub.download_file(
        data_ref.repo_id,
        data_ref.path,
        repo_type=data_ref.repo_type,
        revision=data_ref.revision,
        folder=work / "data",
    )
    resolved = _with_models(data, lambda ref: local.get(ref, ref))
    resolved["evaluation"] = {**data["evaluation"], "data": str(data_file)}
    spec = validate_search(resolved)
    total = (spec.budget.trials or 0) + len(spec.baselines)

    def progress(event: TrialEvent) -> None:
        # counts from the study: after a restart the search goes on from where it was
        what = f"baseline {event.baseline}" if event.baseline else "search"
        note = f"trial {event.finished}/{total} ({what}), best {_fmt(event.best)}"
        worker.store.set_progress(job.id, min(1.0, event.finished / max(1, total)), note)
        status.progress(event.finished / max(1, total), f"⚙️ Job `{job.id}` is searching: {note}.")
        worker.checkpoint(job)  # after the trial is recorded: a cancel or a stop loses nothing

    status.show(f"⚙️ Job `{job.id}` is searching: trial 0/{total}.")
    out = work / "out"
    result = run_search(
        spec,
        str(out),
        storage=f"sqlite:///{(work / 'study.db').resolve()}",
        device=worker.settings.device,
        progress=progress,
        checkpoint=lambda: worker.checkpoint(job),
    )
    assert result is not None
    worker.checkpoint(job)
    # the best recipe names the downloaded folders: name the pinned Hub repos instead
    by_folder = {str(Path(v).resolve()): k for k, v in local.items()}
    recipe_yaml = yaml.safe_dump(
        _walk_models(yaml.safe_load(result.best.recipe), lambda p: by_folder.get(str(Path(p).resolve()), p)),
        sort_keys=False,
    )
    return _publish(
        worker, job, publisher, out, recipe_yaml, search_history(result, spec, str(data_ref), PLOT_FILE)
    )


def _publish(
    worker: Worker, job: Job, publisher: Hub, out: Path, recipe_yaml: str, history: SearchHistory
) -> str:
    spec = job.spec
    name = spec.destination.split("/")[-1]
    rights = worker.rights(job)
    pre = preflight(
        worker.hub,
        recipe_yaml,
        accept_license=spec.accept_license,
        name=name,
        endpoint=worker.settings.hf_endpoint,
        token=rights.read_token(worker.settings.hf_token.get_secret_value()),
        rights=rights,
        private=spec.private,
    )
    lineage = worker.hub.lineage(list(pre.facts), worker.settings.lineage_depth)
    model = out / "model"
    check_loads(model)  # nothing is published unless transformers loads the best merge
    with publisher.publication(spec.destination, private=spec.private, gated=pre.verdict.gated) as pub:
        for file in sorted(model.iterdir()):
            if not file.is_file() or file.name in ("README.md", "mergekit_config.yml"):
                continue
            if file.suffix == ".safetensors":
                pub.upload_now(file.name, file)
            else:
                pub.add(file.name, file)
        pub.add("mergekit_config.yml", pre.config.to_yaml().encode())
        pub.add("search.yml", (spec.search_yaml or "").encode())
        if (out / PLOT_FILE).exists():
            pub.add(PLOT_FILE, out / PLOT_FILE)
        pub.add("README.md", worker.card(job, pre, lineage, history))
        return pub.commit(
            f"Evolve {name} ({job_marker(job.id)})",
            commit_description(job, pre, "; best of an evolutionary search"),
        )
