"""The search file: which models, which method, which parameters in which ranges, how to score, how long.

A search file is YAML, parsed and validated once (pydantic for the shape, then checks against the
method's own parameter declarations); every problem comes back at once, each with its location
and line::

    method: dare_ties
    base_model: ./models/base
    models: [./models/math, ./models/code]
    parameters:                 # searched: one value per model for per-model parameters
      weight: {min: 0.0, max: 1.0}
      density: {min: 0.1, max: 1.0, layer_groups: 2}
    fixed: {lambda: 1.0}        # other method parameters, as in a recipe's top-level `parameters`
    dtype: bfloat16
    evaluation: {kind: perplexity, data: eval.txt, search_size: 64, report_size: 64}
    budget: {trials: 50, minutes: 120}
    seed: 0

The data is shuffled with the seed and cut into disjoint splits: ``search_size`` items score every
trial, ``report_size`` are held out for the report, and an optional ``validation_size`` (default
0) re-scores the ``finalists`` (default 5) best search trials and the baselines to choose the final
recipe, so a recipe that only fits the search split's items does not win on them alone.

Evaluations (see :mod:`engine.evolve.evaluate`): ``perplexity`` on a text file, ``exact_match`` or
``loglikelihood`` on a JSONL file of prompt/answer items, or ``lm_eval`` with lm-evaluation-harness
tasks (the optional ``lm-eval`` extra; see :mod:`engine.evolve.lmeval`), where ``data`` is an
optional folder of task YAML files::

    evaluation: {kind: lm_eval, tasks: [arc_easy], search_size: 64, report_size: 64}
    evaluation: {kind: lm_eval, tasks: [my_task], data: ./tasks, search_size: 64, report_size: 64}

Relative paths (models, data) are read from the search file's folder; model folders are written
into recipes as absolute paths, so the recipes the search writes load from anywhere.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.config import DTypeName, validate_recipe
from engine.errors import RecipeError
from engine.evolve.errors import SearchFileError, SearchProblem
from engine.methods import METHODS, unknown_method_message
from engine.methods.base import MethodSpec, ParamSpec, Scope
from engine.safe_yaml import YamlRefused, list_problems, parse_bounded, read_bounded
from engine.yaml_locations import describe, line_index

EvaluationKind = Literal["lm_eval", "perplexity", "exact_match", "loglikelihood"]
BaselineName = Literal["linear", "ties"]
SEARCHABLE_KINDS = ("float", "int")
PER_MODEL_SCOPES = (Scope.INPUT, Scope.NON_BASE)


def _default_baselines() -> list[BaselineName]:
    return ["linear", "ties"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Range(_Strict):
    """Where one parameter is searched. ``min``/``max`` default to the parameter's declared bounds."""

    min: float | None = None
    max: float | None = None
    log: bool = False
    layer_groups: int = Field(default=1, ge=1, le=64)


class Evaluation(_Strict):
    """How a merge is scored, on which data, and how the data is split between search and report."""

    kind: EvaluationKind
    # the data file; lm_eval: an optional folder of task YAML files (lm-eval's include_path)
    data: str | None = Field(default=None, min_length=1)
    search_size: int = Field(gt=0)  # lm_eval: documents per task
    report_size: int = Field(gt=0)
    # Items scored only to choose the final recipe among the `finalists` best search trials and
    # the baselines (0: the best search score wins); disjoint from both other splits.
    validation_size: int = Field(default=0, ge=0)
    finalists: int = Field(default=5, ge=1)
    block_size: int = Field(default=128, ge=2)  # perplexity: tokens per scored block
    max_new_tokens: int | None = Field(default=None, gt=0)  # exact_match: default, the answer's length
    batch_size: int = Field(default=8, gt=0)
    tasks: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)  # lm_eval
    num_fewshot: int | None = Field(default=None, ge=0)  # lm_eval: default, each task's own


class Budget(_Strict):
    """When to stop: after ``trials`` search trials in the study, or ``minutes`` of this run."""

    trials: int | None = Field(default=None, gt=0)
    minutes: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if self.trials is None and self.minutes is None:
            raise ValueError("give `trials`, `minutes` or both")
        return self


class SearchSpec(_Strict):
    """A validated search file. Build it with :func:`load_search` or :func:`validate_search`."""

    method: str
    base_model: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    parameters: dict[str, Range]
    fixed: dict[str, Any] = Field(default_factory=dict)
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    evaluation: Evaluation
    budget: Budget
    seed: int = Field(default=0, ge=0)
    baselines: list[BaselineName] = Field(default_factory=_default_baselines)
    storage: str | None = None  # an SQLAlchemy URL; default: sqlite in OUT_DIR
    study_name: str | None = None  # default: derived from what is searched (see study_key)

    @field_validator("parameters", mode="before")
    @classmethod
    def _empty_range(cls, value: Any) -> Any:
        # `density: {}` or a bare `density:` searches the declared range
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("parameters")
    @classmethod
    def _something_to_search(cls, value: dict[str, Range]) -> dict[str, Range]:
        if not value:
            raise ValueError("name at least one parameter to search, e.g. `weight: {min: 0, max: 1}`")
        return value

    @property
    def method_spec(self) -> MethodSpec:
        return METHODS[self.method]

    def study_key(self) -> str:
        """A short hash of everything that defines the study (not the budget), for its default name."""
        # validation only picks among finished trials, so it does not make another study
        data = self.model_dump(
            exclude={
                "budget": True,
                "storage": True,
                "study_name": True,
                "evaluation": {"validation_size", "finalists"},
            }
        )
        digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
        return digest[:12]

    def name_of_study(self) -> str:
        return self.study_name or f"evolve-{self.method}-{self.study_key()}"


def load_search(path: str | os.PathLike[str]) -> SearchSpec:
    """Read and validate a search file; relative paths in it are resolved from its folder.

    Raises:
        SearchFileError: every problem found, each with its location and line.
    """
    path = os.fspath(path)
    try:
        text = read_bounded(path)
    except OSError as exc:
        raise SearchFileError.single("", f"cannot read the search file {path}: {exc.strerror}") from None
    except YamlRefused as exc:
        raise SearchFileError([SearchProblem(p.location, p.message) for p in exc.problems], path) from None
    data, lines = parse_search(text, source=path)
    return validate_search(data, base_dir=os.path.dirname(os.path.abspath(path)), lines=lines, source=path)


def parse_search(
    text: str, *, source: str | None = None
) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    """A search file's YAML as a mapping, with the line of each key (for :func:`validate_search`).

    Raises:
        SearchFileError: not valid YAML (with where), or not a mapping.
    """
    try:
        data, node = parse_bounded(text)
    except YamlRefused as exc:
        raise SearchFileError([SearchProblem(p.location, p.message) for p in exc.problems], source) from None
    if not isinstance(data, dict):
        raise SearchFileError.single(
            "", "a search file must be a YAML mapping (see `mergebot evolve --help`)", source
        )
    lines = line_index(node)
    too_long = list_problems(data)
    if too_long:
        raise SearchFileError([_problem(loc, msg, lines) for loc, msg in too_long], source=source)
    return data, lines


def validate_search(
    data: dict[str, Any],
    *,
    base_dir: str | None = None,
    lines: dict[tuple[Any, ...], int] | None = None,
    source: str | None = None,
    on_disk: bool = True,
) -> SearchSpec:
    """Validate an already-parsed search file; see :func:`load_search`.

    With ``on_disk`` false, the models and the data file are not looked for on this machine
    (a service checks a file whose models are Hub repos before it downloads anything).

    Raises:
        SearchFileError: every problem found.
    """
    lines = lines or {}
    problems: list[tuple[tuple[Any, ...], str]] = []
    spec: SearchSpec | None = None
    try:
        spec = SearchSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "is required"
            elif err["type"] == "extra_forbidden":
                msg = _unknown_field_message(err["loc"])
            problems.append((tuple(err["loc"]), msg))
        spec, substituted = _validate_the_rest(data, exc)
        if spec is not None:
            spec = _resolve_paths(spec, base_dir)
            problems.extend(
                p
                for p in _semantic_problems(
                    spec, check_recipe=all(sub[0] != "parameters" for sub in substituted), on_disk=on_disk
                )
                if not any(p[0][: len(sub)] == sub for sub in substituted)
            )
            spec = None
    else:
        spec = _resolve_paths(spec, base_dir)
        problems.extend(_semantic_problems(spec, on_disk=on_disk))
    if problems:
        raise SearchFileError([_problem(loc, msg, lines) for loc, msg in problems], source=source)
    assert spec is not None
    return spec


# valid stand-ins for broken required sections, so the rest of a file is still checked
_STAND_INS: dict[str, Any] = {
    "budget": {"trials": 1},
    "evaluation": {"kind": "perplexity", "data": "-", "search_size": 1, "report_size": 1},
}


def _validate_the_rest(
    data: dict[str, Any], exc: ValidationError
) -> tuple[SearchSpec | None, set[tuple[Any, ...]]]:
    """The file with its broken parts dropped or stood in for, so every mistake is reported in one go."""
    cleaned = dict(data)
    substituted: set[tuple[Any, ...]] = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        if not loc:
            return None, substituted
        key = loc[0]
        if key == "parameters" and len(loc) >= 2 and isinstance(cleaned.get(key), dict):
            cleaned[key] = {k: v for k, v in cleaned[key].items() if k != loc[1]}
            substituted.add(loc[:2])
            continue
        if key in _STAND_INS:
            cleaned[key] = _STAND_INS[key]
        else:
            # optional fields fall back to their defaults; required ones fail below
            cleaned.pop(str(key), None)
        substituted.add((key,))
    if not cleaned.get("parameters"):
        cleaned["parameters"] = {"-": {}}  # nothing left to search: already reported
        substituted.add(("parameters",))
    try:
        return SearchSpec.model_validate(cleaned), substituted
    except ValidationError:
        return None, substituted


def _unknown_field_message(loc: tuple[Any, ...]) -> str:
    owners: dict[str, type[BaseModel]] = {"evaluation": Evaluation, "budget": Budget}
    fields = list(SearchSpec.model_fields)
    if len(loc) == 2 and loc[0] in owners:
        fields = list(owners[str(loc[0])].model_fields)
    elif len(loc) == 3 and loc[0] == "parameters":
        fields = list(Range.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return f"unknown field.{hint} Valid: {', '.join(fields)}."


def _resolve_paths(spec: SearchSpec, base_dir: str | None) -> SearchSpec:
    def model(ref: str) -> str:
        for candidate in (ref, os.path.join(base_dir or "", ref)):
            if os.path.isdir(candidate):
                return os.path.abspath(candidate)
        return ref  # a Hub id; the checks below refuse it with a clear message

    data = spec.evaluation.data
    if data is not None:
        if not os.path.isabs(data) and base_dir:
            data = os.path.join(base_dir, data)
        data = os.path.abspath(data)
    return spec.model_copy(
        update={
            "base_model": model(spec.base_model),
            "models": [model(m) for m in spec.models],
            "evaluation": spec.evaluation.model_copy(update={"data": data}),
        }
    )


def searchable(param: ParamSpec) -> bool:
    """Numeric parameters can be searched; switches (``normalize``) can only be fixed."""
    return param.kind in SEARCHABLE_KINDS


def default_bounds(param: ParamSpec) -> tuple[float | None, float | None]:
    """The declared bounds of a parameter: the search range when the file gives none."""
    return param.minimum, param.maximum


def _semantic_problems(
    spec: SearchSpec, *, check_recipe: bool = True, on_disk: bool = True
) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    method = METHODS.get(spec.method)
    if method is None:
        return [(("method",), unknown_method_message(spec.method))]
    if on_disk and not os.path.isdir(spec.base_model):
        problems.append(
            (
                ("base_model",),
                f"'{spec.base_model}' is not a model folder; evolve loads the base model locally",
            )
        )
    for i, ref in enumerate(spec.models):
        if on_disk and not os.path.isdir(ref):
            problems.append((("models", i), f"'{ref}' is not a model folder; download it first"))
    if len(set(spec.models)) != len(spec.models):
        problems.append((("models",), "the same model is listed twice"))
    problems.extend(_evaluation_problems(spec.evaluation, on_disk=on_disk))

    names = [p.name for p in method.params]
    for pname, rng in spec.parameters.items():
        loc = ("parameters", pname)
        param = method.param(pname)
        if param is None:
            close = difflib.get_close_matches(pname, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(
                (loc, f"{spec.method} has no parameter '{pname}'.{hint} Valid: {', '.join(names)}.")
            )
            continue
        if not searchable(param):
            problems.append(
                (loc, f"'{pname}' is a {param.kind}; only numbers can be searched (set it in `fixed`)")
            )
            continue
        if pname in spec.fixed:
            problems.append((loc, f"'{pname}' is both searched and fixed; keep one"))
        problems.extend(_range_problems(loc, param, rng))

    if not check_recipe or any(loc[:1] == ("parameters",) for loc, _ in problems):
        return problems  # the recipe check below would only repeat them
    try:
        validate_recipe(_template_recipe(spec))
    except RecipeError as exc:
        for problem in exc.problems:
            where = ("fixed",) if problem.location.startswith("parameters") else ()
            hint = (
                " (search it under `parameters` or set it under `fixed`)"
                if "needs `" in problem.message
                else ""
            )
            problems.append((where, f"the recipes this search builds would be invalid: {problem}{hint}"))
    return problems


LM_EVAL_ONLY = ("tasks", "num_fewshot")


def lm_eval_installed() -> bool:
    """Whether lm-evaluation-harness can be imported (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        return False


def _evaluation_problems(
    evaluation: Evaluation, *, on_disk: bool = True
) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    if "finalists" in evaluation.model_fields_set and not evaluation.validation_size:
        problems.append(
            (
                ("evaluation", "finalists"),
                "only used with a validation split; give `validation_size` (items to choose the final "
                "recipe on) or remove `finalists`",
            )
        )
    data = evaluation.data
    if evaluation.kind != "lm_eval":
        if data is None:
            problems.append((("evaluation", "data"), "is required"))
        elif on_disk and not os.path.isfile(data):
            problems.append((("evaluation", "data"), f"no file at {data}"))
        for key in LM_EVAL_ONLY:
            if getattr(evaluation, key) is not None:
                problems.append((("evaluation", key), "only used by kind: lm_eval"))
        if evaluation.kind == "perplexity" and evaluation.max_new_tokens is not None:
            problems.append((("evaluation", "max_new_tokens"), "only used by kind: exact_match"))
        return problems

    if not lm_eval_installed():
        problems.append(
            (
                ("evaluation", "kind"),
                "lm_eval needs lm-evaluation-harness, which is not installed; "
                "install it with `pip install 'mergebot[lm-eval]'`",
            )
        )
    if evaluation.tasks is None:
        problems.append(
            (("evaluation", "tasks"), "is required for kind: lm_eval (lm-eval task names, e.g. [arc_easy])")
        )
    if data is not None:
        if not os.path.isdir(data):
            problems.append(
                (
                    ("evaluation", "data"),
                    f"no folder at {data}; for kind: lm_eval, `data` is a folder of lm-eval task YAML files",
                )
            )
        elif not any(p.suffix in (".yaml", ".yml") for p in Path(data).rglob("*")):
            problems.append((("evaluation", "data"), f"{data} holds no lm-eval task YAML files"))
    if evaluation.max_new_tokens is not None:
        problems.append((("evaluation", "max_new_tokens"), "only used by kind: exact_match"))
    if "block_size" in evaluation.model_fields_set:
        problems.append((("evaluation", "block_size"), "only used by kind: perplexity"))
    return problems


def _range_problems(loc: tuple[Any, ...], param: ParamSpec, rng: Range) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    declared_low, declared_high = default_bounds(param)
    low = rng.min if rng.min is not None else declared_low
    high = rng.max if rng.max is not None else declared_high
    if low is None or high is None:
        missing = "min" if low is None else "max"
        problems.append(((*loc, missing), f"'{param.name}' has no declared bound here; give `{missing}`"))
        return problems
    for key, value in (("min", rng.min), ("max", rng.max)):
        if value is None:
            continue
        if key == "min" and param.exclusive_minimum and value == param.minimum:
            continue  # searched from just above the bound (see lower_bound)
        reason = param.check_range(value)
        if reason:
            problems.append(((*loc, key), f"{value!r} {reason}"))
    if low >= high:
        problems.append((loc, f"min ({low:g}) must be below max ({high:g})"))
    if rng.log and low <= 0:
        problems.append(((*loc, "log"), "a log-scale range needs min > 0"))
    if param.kind == "int" and (float(low) != int(low) or float(high) != int(high)):
        problems.append((loc, f"'{param.name}' is a whole number; give whole min and max"))
    return problems


def lower_bound(param: ParamSpec, rng: Range) -> float:
    """The searched minimum, nudged inside an exclusive declared minimum (density > 0)."""
    low = rng.min if rng.min is not None else param.minimum
    assert low is not None
    if param.exclusive_minimum and param.minimum is not None and low <= param.minimum:
        low = param.minimum + 1e-3 * (
            (rng.max if rng.max is not None else param.maximum or 1.0) - param.minimum
        )
    return float(low)


def upper_bound(param: ParamSpec, rng: Range) -> float:
    high = rng.max if rng.max is not None else param.maximum
    assert high is not None
    return float(high)


def recipe_base(spec: SearchSpec) -> dict[str, Any]:
    """The parts of every recipe this search builds that do not depend on the trial."""
    method = spec.method_spec
    data: dict[str, Any] = {"merge_method": spec.method}
    if method.needs_base:
        data["base_model"] = spec.base_model
    if spec.fixed:
        data["parameters"] = dict(spec.fixed)
    for key in ("dtype", "out_dtype"):
        if getattr(spec, key) is not None:
            data[key] = getattr(spec, key)
    data["random_seed"] = spec.seed
    return data


def _template_recipe(spec: SearchSpec) -> dict[str, Any]:
    """A recipe with every searched parameter at a valid placeholder, to validate the rest."""
    method = spec.method_spec
    data = recipe_base(spec)
    shared: dict[str, Any] = dict(data.get("parameters", {}))
    per_model: dict[str, Any] = {}
    for pname in spec.parameters:
        param = method.param(pname)
        if param is None or not searchable(param):
            continue
        rng = spec.parameters[pname]
        low = rng.min if rng.min is not None else param.minimum
        high = rng.max if rng.max is not None else param.maximum
        value: float | int = (
            (low + high) / 2 if low is not None and high is not None else (high or low or 0.0)
        )
        if param.kind == "int":
            value = round(value)
        (per_model if param.scope in PER_MODEL_SCOPES else shared)[pname] = value
    if shared:
        data["parameters"] = shared
    data["models"] = [
        {"model": m, "parameters": _for_model(method, m == spec.base_model, per_model)} for m in spec.models
    ]
    return data


def _for_model(method: MethodSpec, is_base: bool, values: dict[str, Any]) -> dict[str, Any]:
    """Per-model values, less those the method does not take for the base (Scope.NON_BASE)."""
    if not is_base:
        return dict(values)
    return {k: v for k, v in values.items() if (p := method.param(k)) is None or p.scope != Scope.NON_BASE}


def takes_value(method: MethodSpec, param: ParamSpec, model: str, base_model: str) -> bool:
    """Whether ``model`` gets its own value of a per-model parameter (the base has no NON_BASE ones)."""
    return not (param.scope == Scope.NON_BASE and method.needs_base and model == base_model)


def _problem(loc: tuple[Any, ...], message: str, lines: dict[tuple[Any, ...], int]) -> SearchProblem:
    return SearchProblem(describe(loc, lines), message)
