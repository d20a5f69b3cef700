"""The recipe: mergekit's YAML format, parsed and validated once.

Everything after :func:`load_recipe` trusts the :class:`MergeConfig` it returns. Problems
are collected, not raised one by one, so a user sees every mistake in one go, each with
its location (``models[1].parameters.density``) and its line in the YAML.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator

from engine.errors import RecipeError, RecipeProblem
from engine.methods import METHODS, all_param_names, unknown_method_message
from engine.methods.base import ParamSpec, ParamValue, Scope
from engine.safe_yaml import YamlRefused, list_problems, parse_bounded, read_bounded
from engine.yaml_locations import describe, line_index

log = logging.getLogger(__name__)

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
    parameters: Parameters | None = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    random_seed: int | None = None

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
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def to_yaml(self) -> str:
        """The recipe in mergekit's YAML, with settings written back in their original forms."""
        return yaml.dump(_dump(self.model_dump(exclude_none=True)), Dumper=_RecipeDumper, sort_keys=False)


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
    """Validate an already-parsed recipe mapping (see :func:`load_recipe`)."""
    lines = lines or {}
    problems: list[tuple[tuple[Any, ...], str]] = []
    if "modules" in data:
        problems.append(
            (("modules",), "`modules:` (multi-module models) is not supported; use `models` or `slices`")
        )
    cleaned = {k: v for k, v in data.items() if k != "modules"}
    unknown = [k for k in cleaned if k not in MergeConfig.model_fields]
    for key in unknown:
        close = difflib.get_close_matches(str(key), list(MergeConfig.model_fields), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        problems.append(((key,), f"unknown field.{hint}"))
        cleaned.pop(key)
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
        problems.extend(_semantic_problems(config))
    if problems:
        raise RecipeError([_problem(loc, msg, lines) for loc, msg in problems], source=source)
    assert config is not None
    return config


def _problem(loc: tuple[Any, ...], message: str, lines: dict[tuple[Any, ...], int]) -> RecipeProblem:
    return RecipeProblem(describe(loc, lines), message)


def _semantic_problems(config: MergeConfig) -> list[tuple[tuple[Any, ...], str]]:
    """Checks that need the method: structure, required and known parameters, ranges."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    spec = METHODS.get(config.merge_method)
    if spec is None:
        return [(("merge_method",), unknown_method_message(config.merge_method))]
    if bool(config.models) == bool(config.slices):
        problems.append(
            ((), "give exactly one of `models` (merge whole models) or `slices` (merge layer ranges)")
        )
        return problems
    if spec.needs_base and not config.base_model and not any(s.base_model for s in config.slices or []):
        problems.append(
            (("base_model",), f"{spec.name} needs a `base_model` (the model the others were tuned from)")
        )
    if config.random_seed is not None and config.random_seed < 0:
        problems.append((("random_seed",), "must be a non-negative integer"))
    problems.extend(_tokenizer_problems(config))

    # Inputs per output group, to check counts.
    groups: list[tuple[tuple[Any, ...], list[str], str | None]] = []
    if config.models:
        names = [m.model for m in config.models]
        if config.base_model and config.base_model not in names:
            names.append(config.base_model)
        groups.append((("models",), names, config.base_model))
    for s_index, out_slice in enumerate(config.slices or []):
        names = [src.model for src in out_slice.sources]
        base = out_slice.base_model or config.base_model
        if spec.needs_base and base and base not in names:
            names.append(base)
        groups.append((("slices", s_index, "sources"), names, base))
        lengths = {src.layer_range[1] - src.layer_range[0] for src in out_slice.sources}
        if len(lengths) > 1:
            problems.append(
                (
                    ("slices", s_index, "sources"),
                    f"all sources of a slice must span as many layers, got {sorted(lengths)}",
                )
            )
        if not out_slice.sources:
            problems.append((("slices", s_index, "sources"), "a slice needs at least one source"))
    for loc, names, base in groups:
        if len(set(names)) != len(names):
            problems.append((loc, "the same model is listed twice"))
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
        if spec.name == "slerp" and base and base not in names:
            problems.append((loc, "slerp interpolates from the base model: list it among the models"))

    problems.extend(_parameter_problems(config, spec))
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


def _parameter_problems(config: MergeConfig, spec: Any) -> list[tuple[tuple[Any, ...], str]]:
    problems: list[tuple[tuple[Any, ...], str]] = []
    known_anywhere = all_param_names()
    per_model_scopes = (Scope.INPUT, Scope.NON_BASE)

    def check(params: dict[str, Setting] | None, loc: tuple[Any, ...], per_model: bool) -> None:
        for pname, setting in (params or {}).items():
            pspec = spec.param(pname)
            if pspec is None:
                if pname in known_anywhere:
                    log.warning(
                        "%s: parameter '%s' has no effect with %s", ".".join(map(str, loc)), pname, spec.name
                    )
                    continue
                names = [p.name for p in spec.params]
                close = difflib.get_close_matches(pname, names, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                valid = ", ".join(names) or "none"
                problems.append(((*loc, pname), f"unknown parameter for {spec.name}.{hint} Valid: {valid}."))
                continue
            if per_model and pspec.scope not in per_model_scopes:
                log.warning("%s: '%s' is set once for all models; a per-model value is ignored", loc, pname)
            for suffix, value in setting.scalars():
                try:
                    coerced = pspec.coerce(value)
                except ValueError as exc:
                    problems.append(((*loc, f"{pname}{suffix}"), str(exc)))
                    continue
                reason = pspec.check_range(coerced)
                if reason:
                    problems.append(((*loc, f"{pname}{suffix}"), f"{coerced!r} {reason}"))

    check(config.parameters, ("parameters",), per_model=False)
    for i, m in enumerate(config.models or []):
        check(m.parameters, ("models", i, "parameters"), per_model=True)
    for s_index, out_slice in enumerate(config.slices or []):
        check(out_slice.parameters, ("slices", s_index, "parameters"), per_model=False)
        for j, src in enumerate(out_slice.sources):
            check(src.parameters, ("slices", s_index, "sources", j, "parameters"), per_model=True)

    # Required parameters must be set somewhere that applies to every model that needs them.
    top = config.parameters or {}
    for pspec in spec.params:
        if not pspec.required or pspec.name in top:
            continue
        if pspec.scope == Scope.SHARED:
            slice_has = bool(config.slices) and all(
                pspec.name in (s.parameters or {}) for s in config.slices or []
            )
            if not slice_has:
                problems.append((("parameters",), f"{spec.name} needs `{pspec.name}` ({pspec.doc})"))
            continue
        for i, m in enumerate(config.models or []):
            if pspec.scope == Scope.NON_BASE and m.model == config.base_model:
                continue
            if pspec.name not in (m.parameters or {}):
                problems.append(
                    (("models", i), f"{spec.name} needs `{pspec.name}` for model '{m.model}' ({pspec.doc})")
                )
        for s_index, out_slice in enumerate(config.slices or []):
            if pspec.name in (out_slice.parameters or {}):
                continue
            base = out_slice.base_model or config.base_model
            for j, src in enumerate(out_slice.sources):
                if pspec.scope == Scope.NON_BASE and src.model == base:
                    continue
                if pspec.name not in (src.parameters or {}):
                    problems.append(
                        (
                            ("slices", s_index, "sources", j),
                            f"{spec.name} needs `{pspec.name}` for model '{src.model}' ({pspec.doc})",
                        )
                    )
    return problems
