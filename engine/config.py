"""The recipe: mergekit's YAML format, parsed and validated once.

Everything after :func:`load_recipe` trusts the :class:`MergeConfig` it returns. Problems
are collected, not raised one by one, so a user sees every mistake in one go, each with
its location (``models[1].parameters.density``) and its line in the YAML.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, PrivateAttr, ValidationError, field_validator

from engine.errors import RecipeError, RecipeProblem
from engine.methods import METHODS, all_param_names, unknown_method_message
from engine.methods.base import MethodSpec, ParamSpec, ParamValue, Scope
from engine.modules import MODULE_NAMES
from engine.safe_yaml import YamlRefused, list_problems, parse_bounded, read_bounded
from engine.yaml_locations import describe, line_index

Scalar = bool | int | float | str
DTypeName = Literal["float32", "float16", "bfloat16", "float64"]
DTYPE_ALIASES: dict[str, DTypeName] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
    "double": "float64",
}


@dataclass(frozen=True)
class Branch:
    """One ``filter``/``value`` pair; ``values`` has one entry for a scalar, more for a gradient."""

    filter: str | None
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Setting:
    """A parameter value as written: a scalar, a gradient over layers, or filtered branches."""

    branches: tuple[Branch, ...]

    def resolve(self, tensor_name: str, t: float, spec: ParamSpec) -> ParamValue | None:
        """The value for one tensor at relative depth ``t`` in [0, 1], or None if no filter matches.

        Gradients interpolate linearly between neighbouring anchors, as mergekit does:
        with n anchors, position ``t * (n - 1)``. Non-numeric gradients pick the anchor below.
        """
        for branch in self.branches:
            if (
                branch.filter is None
                or branch.filter == "*"
                or (tensor_name and branch.filter in tensor_name)
            ):
                return _interpolate([spec.coerce(v) for v in branch.values], t)
        return None

    def scalars(self) -> Iterator[tuple[str, Scalar]]:
        """Every anchor value with a location suffix, for range checks."""
        for b_index, branch in enumerate(self.branches):
            for v_index, value in enumerate(branch.values):
                where = f"[{b_index}].value" if len(self.branches) > 1 or branch.filter else ""
                if len(branch.values) > 1:
                    where += f"[{v_index}]"
                yield where, value


def _interpolate(values: list[ParamValue], t: float) -> ParamValue:
    if len(values) == 1:
        return values[0]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * float(values[low]) + frac * float(values[high])


def _scalar_or_gradient(raw: Any) -> tuple[Scalar, ...]:
    if isinstance(raw, bool | int | float | str):
        return (raw,)
    if isinstance(raw, list) and raw and all(isinstance(v, bool | int | float | str) for v in raw):
        return tuple(raw)
    raise ValueError(f"expected a number, true/false or a list of them (a gradient), got {raw!r}")


def parse_setting(raw: Any) -> Setting:
    """Parse mergekit's parameter forms: ``0.5``, ``[0, 0.5, 1]``, ``{filter, value}`` or a list of those."""
    if isinstance(raw, dict):
        raw = [raw]
    if isinstance(raw, list) and raw and all(isinstance(item, dict) for item in raw):
        branches = []
        for index, item in enumerate(raw):
            unknown = set(item) - {"filter", "value"}
            if unknown or "value" not in item:
                raise ValueError(
                    f"item {index} must have a `value` (and optionally a `filter`), got keys {sorted(item)}"
                )
            flt = item.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ValueError(f"item {index}: filter must be text such as `self_attn` or `mlp`")
            branches.append(Branch(flt, _scalar_or_gradient(item["value"])))
        return Setting(tuple(branches))
    return Setting((Branch(None, _scalar_or_gradient(raw)),))


SettingField = Annotated[Any, AfterValidator(parse_setting)]
Parameters = dict[str, SettingField]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _model_reference(value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError("must be a model reference: a local folder path or a Hub id such as org/name")


ModelRef = Annotated[Any, AfterValidator(_model_reference)]


class InputModel(_Strict):
    model: ModelRef
    parameters: Parameters | None = None


class InputSlice(_Strict):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"must be [start, end) with 0 <= start < end, got [{start}, {end}]")
        return value


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: ModelRef | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class OutputModule(_Strict):
    """One entry of ``modules:``: how one part of a multi-module model (e.g. its vision tower) is merged."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: Parameters | None = None


class ModelTokenEmbedding(_Strict):
    """``{kind: model_token, model, token | token_id}``: a row of one model's own embedding."""

    kind: Literal["model_token"]
    model: ModelRef
    token_id: int | None = None
    token: str | None = None


class ZeroEmbedding(_Strict):
    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """How one token's row is filled where a model lacks it (``force``: in every model)."""

    source: ModelTokenEmbedding | ZeroEmbedding | ModelRef | None = None
    force: bool = False


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary and how new rows are filled."""

    source: str = "union"  # union | base | a model of the recipe
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None


class MergeConfig(_Strict):
    """A validated recipe. Build it with :func:`load_recipe`, which also checks it against the method."""

    merge_method: str
    base_model: ModelRef | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    parameters: Parameters | None = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    random_seed: int | None = None
    _notes: tuple[str, ...] = PrivateAttr(default=())

    @property
    def notes(self) -> tuple[str, ...]:
        """What the recipe sets to no effect (keys and parameters mergekit ignores), one line each."""
        return self._notes

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            name = value.removeprefix("torch.")
            if name not in DTYPE_ALIASES:
                raise ValueError(f"unknown dtype '{value}'; use one of bfloat16, float16, float32, float64")
            return DTYPE_ALIASES[name]
        return value

    @property
    def vocabulary_source(self) -> str | None:
        """``base``, ``union`` or a model: the output's tokenizer when it is built, else None."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model the recipe names, base first, each once, in recipe order."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for part in self.parts():
            for m in part.models or []:
                seen[m.model] = None
            for s in part.slices or []:
                if s.base_model:
                    seen[s.base_model] = None
                for src in s.sources:
                    seen[src.model] = None
        return list(seen)

    def parts(self) -> list[RecipePart]:
        """The recipe's independently merged parts: the whole model, or one per entry of ``modules``."""
        if self.modules:
            return [
                RecipePart(name, ("modules", name), m.models, m.slices, m.parameters)
                for name, m in self.modules.items()
            ]
        return [RecipePart(None, (), self.models, self.slices, None)]

    def to_yaml(self) -> str:
        """The recipe in mergekit's YAML, with settings written back in their original forms."""
        return yaml.dump(_dump(self.model_dump(exclude_none=True)), Dumper=_RecipeDumper, sort_keys=False)


@dataclass(frozen=True)
class RecipePart:
    """The models or slices merged for one module (``module`` None: the whole model), and where they are."""

    module: str | None
    loc: tuple[Any, ...]
    models: list[InputModel] | None
    slices: list[OutputSlice] | None
    parameters: dict[str, Setting] | None  # the module's own; the recipe's top-level ones apply beneath


class _RecipeDumper(yaml.SafeDumper):
    """Writes gradients (lists of numbers) on one line, as recipes are usually written.

    Never writes anchors or aliases, which :func:`load_recipe` refuses.
    """

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = bool(data) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


def _dump(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"branches"}:
        branches = value["branches"]
        out = []
        for b in branches:
            v = list(b["values"]) if len(b["values"]) > 1 else b["values"][0]
            out.append({"filter": b["filter"], "value": v} if b["filter"] is not None else {"value": v})
        if len(out) == 1 and "filter" not in out[0]:
            return out[0]["value"]
        return out
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_dump(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# Loading and validation


def load_recipe(source: str | os.PathLike[str], *, name: str | None = None) -> MergeConfig:
    """Parse and validate a recipe from a path or from YAML text.

    Raises:
        RecipeError: every problem found, each with its location and line.
    """
    text, origin = _read_source(source)
    origin = name or origin
    try:
        data, node = parse_bounded(text)
    except YamlRefused as exc:
        raise RecipeError([RecipeProblem(p.location, p.message) for p in exc.problems], origin) from None
    if not isinstance(data, dict):
        raise RecipeError.single("", "a recipe must be a YAML mapping with at least `merge_method`", origin)
    lines = line_index(node)
    too_long = list_problems(data)
    if too_long:
        raise RecipeError([_problem(loc, msg, lines) for loc, msg in too_long], source=origin)
    return validate_recipe(data, lines=lines, source=origin)


def _read_source(source: str | os.PathLike[str]) -> tuple[str, str | None]:
    if isinstance(source, os.PathLike) or (
        "\n" not in str(source) and str(source).endswith((".yml", ".yaml"))
    ):
        path = os.fspath(source)
        try:
            return read_bounded(path), path
        except OSError as exc:
            raise RecipeError.single("", f"cannot read the recipe file {path}: {exc.strerror}") from None
        except YamlRefused as exc:
            raise RecipeError([RecipeProblem(p.location, p.message) for p in exc.problems], path) from None
    return str(source), None


def validate_recipe(
    data: dict[str, Any], *, lines: dict[tuple[Any, ...], int] | None = None, source: str | None = None
) -> MergeConfig:
    """Validate an already-parsed recipe mapping (see :func:`load_recipe`).

    Keys and parameters that mergekit ignores are accepted and reported in
    :attr:`MergeConfig.notes` (or, when the recipe is refused, in :attr:`RecipeError.notes`).
    """
    lines = lines or {}
    cleaned, ignored = _drop_ignored_keys(data)
    problems: list[tuple[tuple[Any, ...], str]] = []
    config: MergeConfig | None = None
    try:
        config = MergeConfig.model_validate(cleaned)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                msg = "is required"
            problems.append((loc, msg))
        # Check the rest of the recipe too, so every mistake is reported in one go.
        broken = {err["loc"][0] for err in exc.errors() if err["loc"]}
        if "merge_method" not in broken:
            try:
                config = MergeConfig.model_validate({k: v for k, v in cleaned.items() if k not in broken})
            except ValidationError:
                config = None
    if config is not None:
        problems.extend(_semantic_problems(config, ignored))
    ignored.sort(key=lambda item: _line(item[0], lines))  # stable: in the order they are written
    notes = [f"{describe(loc, lines)}: {message}" for loc, message in ignored]
    if problems:
        raise RecipeError([_problem(loc, msg, lines) for loc, msg in problems], source=source, notes=notes)
    assert config is not None
    config._notes = tuple(notes)
    return config


def _problem(loc: tuple[Any, ...], message: str, lines: dict[tuple[Any, ...], int]) -> RecipeProblem:
    return RecipeProblem(describe(loc, lines), message)


def _line(loc: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int:
    """The line of ``loc`` or of its nearest ancestor with one (0: none)."""
    return next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), 0)


# Top-level keys seen in published recipes that mergekit reads nowhere, and why they do nothing.
_IGNORED_KEY_REASONS: dict[str, str] = {
    "name": "mergekit-multi uses it to name one recipe among several; here it is one merge",
    "target_model": "it is not a recipe key; the output path is the command's argument "
    "(`mergebot merge RECIPE OUT_DIR`, as `mergekit-yaml RECIPE OUT_DIR`), or the model name "
    "given to the bot or the Space",
}


def _drop_ignored_keys(data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[tuple[Any, ...], str]]]:
    """The recipe without the keys mergekit ignores, and a note for each one dropped.

    mergekit's schema lets unknown keys through at every level, so recipes carry them
    (mergekit-multi's ``name``, a misplaced ``weight``); they are dropped here, each with a
    note, and the schema below stays strict for everything else.
    """
    notes: list[tuple[tuple[Any, ...], str]] = []

    def keep(value: Any, fields: dict[str, Any], loc: tuple[Any, ...]) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for key, item in value.items():
            if key in fields:
                out[key] = item
            else:
                notes.append(((*loc, key), _ignored_key_message(str(key), list(fields), top=not loc)))
        return out

    def each(items: Any, fields: dict[str, Any], loc: tuple[Any, ...]) -> Any:
        if not isinstance(items, list):
            return items
        return [keep(item, fields, (*loc, i)) for i, item in enumerate(items)]

    def group(value: Any, loc: tuple[Any, ...]) -> Any:
        """``models`` and ``slices`` (with their sources) of the recipe or of one module."""
        if not isinstance(value, dict):
            return value
        out = dict(value)
        if "models" in out:
            out["models"] = each(out["models"], InputModel.model_fields, (*loc, "models"))
        if "slices" in out:
            out["slices"] = each(out["slices"], OutputSlice.model_fields, (*loc, "slices"))
            if isinstance(out["slices"], list):
                out["slices"] = [
                    {
                        **s,
                        "sources": each(
                            s["sources"], InputSlice.model_fields, (*loc, "slices", i, "sources")
                        ),
                    }
                    if isinstance(s, dict) and "sources" in s
                    else s
                    for i, s in enumerate(out["slices"])
                ]
        return out

    cleaned = group(keep(data, MergeConfig.model_fields, ()), ())
    modules = cleaned.get("modules")
    if isinstance(modules, dict):
        cleaned["modules"] = {
            name: group(keep(m, OutputModule.model_fields, ("modules", name)), ("modules", name))
            for name, m in modules.items()
        }
    tokenizer = cleaned.get("tokenizer")
    if isinstance(tokenizer, dict):
        tokenizer = keep(tokenizer, TokenizerConfig.model_fields, ("tokenizer",))
        tokens = tokenizer.get("tokens")
        if isinstance(tokens, dict):
            tokenizer["tokens"] = {
                token: keep(t, TokenEmbedding.model_fields, ("tokenizer", "tokens", token))
                for token, t in tokens.items()
            }
        cleaned["tokenizer"] = tokenizer
    return cleaned, notes


def _ignored_key_message(key: str, fields: list[str], *, top: bool) -> str:
    if top and key in _IGNORED_KEY_REASONS:
        return f"field '{key}' has no effect: {_IGNORED_KEY_REASONS[key]}"
    if key == "base_model":
        return "field 'base_model' has no effect here: the base is the recipe's `base_model` or a slice's"
    if "parameters" in fields and key in all_param_names():
        return f"field '{key}' has no effect here (did you mean to put it under `parameters`?)"
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"field '{key}' has no effect{hint}"


def _semantic_problems(
    config: MergeConfig, notes: list[tuple[tuple[Any, ...], str]]
) -> list[tuple[tuple[Any, ...], str]]:
    """Checks that need the method: structure, required and known parameters, ranges.

    Parameters that have no effect are appended to ``notes``.
    """
    problems: list[tuple[tuple[Any, ...], str]] = []
    spec = METHODS.get(config.merge_method)
    if spec is None:
        return [(("merge_method",), unknown_method_message(config.merge_method))]
    if sum(map(bool, (config.models, config.slices, config.modules))) != 1:
        problems.append(
            (
                (),
                "give exactly one of `models` (merge whole models), `slices` (merge layer ranges) "
                "or `modules` (merge each module of a multi-module model its own way)",
            )
        )
        return problems
    for name, module in (config.modules or {}).items():
        loc = ("modules", name)
        if name not in MODULE_NAMES:
            close = difflib.get_close_matches(str(name), MODULE_NAMES, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(
                (loc, f"unknown module '{name}'.{hint} Modules mergebot knows: {', '.join(MODULE_NAMES)}.")
            )
        if bool(module.models) == bool(module.slices):
            problems.append((loc, "give exactly one of `models` or `slices` for this module"))
    if problems:
        return problems
    parts = config.parts()
    all_slices = [s for part in parts for s in part.slices or []]
    if spec.needs_base and not config.base_model and not any(s.base_model for s in all_slices):
        problems.append(
            (("base_model",), f"{spec.name} needs a `base_model` (the model the others were tuned from)")
        )
    if config.random_seed is not None and config.random_seed < 0:
        problems.append((("random_seed",), "must be a non-negative integer"))
    problems.extend(_tokenizer_problems(config))
    for part in parts:
        problems.extend(_group_problems(config, part, spec))
        problems.extend(_parameter_problems(config, part, spec, notes))
    return problems


def _group_problems(
    config: MergeConfig, part: RecipePart, spec: MethodSpec
) -> list[tuple[tuple[Any, ...], str]]:
    """Input counts of each output group (the models, or each slice) of one part of the recipe."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    # (location, models listed, the group's base, whether the base was set on the slice itself)
    groups: list[tuple[tuple[Any, ...], list[str], str | None, bool]] = []
    if part.models:
        groups.append(((*part.loc, "models"), [m.model for m in part.models], config.base_model, False))
    for s_index, out_slice in enumerate(part.slices or []):
        loc = (*part.loc, "slices", s_index, "sources")
        names = [src.model for src in out_slice.sources]
        groups.append((loc, names, out_slice.base_model or config.base_model, bool(out_slice.base_model)))
        lengths = {src.layer_range[1] - src.layer_range[0] for src in out_slice.sources}
        if len(lengths) > 1:
            problems.append((loc, f"all sources of a slice must span as many layers, got {sorted(lengths)}"))
        if not out_slice.sources:
            problems.append((loc, "a slice needs at least one source"))
    for loc, listed, base, on_slice in groups:
        if len(set(listed)) != len(listed):
            problems.append((loc, "the same model is listed twice"))
        if spec.name == "slerp" and base and base not in listed and listed:
            # counting the base in would report "at most 2 models, got 3" for the two listed
            whose = "the slice's base_model" if on_slice else "the base_model"
            among = "its sources" if loc[-1] == "sources" else "the models"
            shown = ", ".join(f"'{m}'" for m in listed)
            problems.append(
                (
                    loc,
                    f"{whose} '{base}' is not among {among} ({shown}); slerp interpolates from the base "
                    f"towards one other model, so list '{base}' and one other model",
                )
            )
            continue
        names = [*listed, base] if spec.needs_base and base and base not in listed else listed
        n = len(names)
        if n < spec.min_inputs:
            problems.append((loc, f"{spec.name} needs at least {spec.min_inputs} models, got {n}"))
        if spec.max_inputs is not None and n > spec.max_inputs:
            more = " (use `slices` to stack layers from several models)" if spec.name == "passthrough" else ""
            extra = " (the base and one other model)" if spec.name == "slerp" else ""
            problems.append(
                (loc, f"{spec.name} takes at most {spec.max_inputs} models{extra}, got {n}{more}")
            )
        non_base = len([name for name in names if name != base])
        if non_base < spec.min_non_base or (spec.max_non_base is not None and non_base > spec.max_non_base):
            want = (
                f"exactly {spec.min_non_base}"
                if spec.min_non_base == spec.max_non_base
                else f"at least {spec.min_non_base}"
                if spec.max_non_base is None
                else f"{spec.min_non_base} to {spec.max_non_base}"
            )
            noun = "model" if (spec.max_non_base or spec.min_non_base) == 1 else "models"
            problems.append((loc, f"{spec.name} takes {want} {noun} besides the base model, got {non_base}"))
    return problems


def _tokenizer_problems(config: MergeConfig) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    models = config.referenced_models()
    if config.tokenizer is not None and config.tokenizer_source is not None:
        problems.append(
            (("tokenizer_source",), "give either `tokenizer_source` or a `tokenizer:` block, not both")
        )
    where = ("tokenizer", "source") if config.tokenizer is not None else ("tokenizer_source",)
    source = config.vocabulary_source
    if source is not None and source not in ("base", "union", *models):
        close = difflib.get_close_matches(source, ["base", "union", *models], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        problems.append((where, f"'{source}' is not `base`, `union` or one of the recipe's models.{hint}"))
    if config.tokenizer is None:
        return problems
    multiple = config.tokenizer.pad_to_multiple_of
    if multiple is not None and multiple < 1:
        problems.append((("tokenizer", "pad_to_multiple_of"), f"must be a positive integer, got {multiple}"))
    for token, embedding in (config.tokenizer.tokens or {}).items():
        loc = ("tokenizer", "tokens", token, "source")
        src = embedding.source
        model = src.model if isinstance(src, ModelTokenEmbedding) else src
        if isinstance(model, str) and model not in models:
            problems.append((loc, f"'{model}' is not one of the recipe's models"))
        if isinstance(src, ModelTokenEmbedding) and (src.token is None) == (src.token_id is None):
            problems.append((loc, "give exactly one of `token` and `token_id`"))
    return problems


def _parameter_problems(
    config: MergeConfig, part: RecipePart, spec: MethodSpec, notes: list[tuple[tuple[Any, ...], str]]
) -> list[tuple[tuple[Any, ...], str]]:
    """Known parameters and their ranges in one part of the recipe; the top level is checked with the first."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    known_anywhere = all_param_names()
    per_model_scopes = (Scope.INPUT, Scope.NON_BASE)

    def check(params: dict[str, Setting] | None, loc: tuple[Any, ...], per_model: bool) -> None:
        for pname, setting in (params or {}).items():
            pspec = spec.param(pname)
            if pspec is None:
                if pname in known_anywhere:
                    notes.append(((*loc, pname), f"parameter '{pname}' has no effect with {spec.name}"))
                    continue
                names = [p.name for p in spec.params]
                close = difflib.get_close_matches(pname, names, n=1)
                hint = (
                    f" (did you mean '{close[0]}'?)"
                    if close
                    else f" ({spec.name} takes: {', '.join(names) or 'none'})"
                )
                notes.append(((*loc, pname), f"parameter '{pname}' has no effect{hint}"))
                continue
            if per_model and pspec.scope not in per_model_scopes:
                notes.append(
                    (
                        (*loc, pname),
                        f"parameter '{pname}' is set once for all models; a per-model value has no effect",
                    )
                )
                continue  # mergekit never reads it, so neither is its value checked
            for suffix, value in setting.scalars():
                try:
                    coerced = pspec.coerce(value)
                except ValueError as exc:
                    problems.append(((*loc, f"{pname}{suffix}"), str(exc)))
                    continue
                reason = pspec.check_range(coerced)
                if reason:
                    problems.append(((*loc, f"{pname}{suffix}"), f"{coerced!r} {reason}"))

    if part.loc == config.parts()[0].loc:
        check(config.parameters, ("parameters",), per_model=False)
    check(part.parameters, (*part.loc, "parameters"), per_model=False)
    for i, m in enumerate(part.models or []):
        check(m.parameters, (*part.loc, "models", i, "parameters"), per_model=True)
    for s_index, out_slice in enumerate(part.slices or []):
        check(out_slice.parameters, (*part.loc, "slices", s_index, "parameters"), per_model=False)
        for j, src in enumerate(out_slice.sources):
            check(src.parameters, (*part.loc, "slices", s_index, "sources", j, "parameters"), per_model=True)

    # Required parameters must be set somewhere that applies to every model that needs them.
    above = {**(config.parameters or {}), **(part.parameters or {})}
    for pspec in spec.params:
        if not pspec.required or pspec.name in above:
            continue
        if pspec.scope == Scope.SHARED:
            slice_has = bool(part.slices) and all(
                pspec.name in (s.parameters or {}) for s in part.slices or []
            )
            if not slice_has:
                problems.append(
                    ((*part.loc, "parameters"), f"{spec.name} needs `{pspec.name}` ({pspec.doc})")
                )
            continue
        for i, m in enumerate(part.models or []):
            if pspec.scope == Scope.NON_BASE and m.model == config.base_model:
                continue
            if pspec.name not in (m.parameters or {}):
                problems.append(
                    (
                        (*part.loc, "models", i),
                        f"{spec.name} needs `{pspec.name}` for model '{m.model}' ({pspec.doc})",
                    )
                )
        for s_index, out_slice in enumerate(part.slices or []):
            if pspec.name in (out_slice.parameters or {}):
                continue
            base = out_slice.base_model or config.base_model
            for j, src in enumerate(out_slice.sources):
                if pspec.scope == Scope.NON_BASE and src.model == base:
                    continue
                if pspec.name not in (src.parameters or {}):
                    problems.append(
                        (
                            (*part.loc, "slices", s_index, "sources", j),
                            f"{spec.name} needs `{pspec.name}` for model '{src.model}' ({pspec.doc})",
                        )
                    )
    return problems
