"""The merge form and the YAML editor, kept in step both ways.

The form covers what most merges need: a method, a base, models with their per-model
numbers, the method's shared numbers, dtype, output name and visibility. Which fields
appear is derived from the method's parameter declarations (engine.methods), so a new
method or parameter shows up here without a second table. A recipe the form cannot
express (gradients, filters, slices) stays editable as YAML; the form then says so
instead of silently dropping what it cannot show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from engine import METHODS, MergeConfig, RecipeError, validate_recipe
from engine.methods.base import ParamSpec, ParamValue, Scope

DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModelRow:
    """One model of the merge and its per-model numbers (weight, density...)."""

    model: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeForm:
    method: str
    base_model: str | None
    models: tuple[ModelRow, ...]
    shared: Mapping[str, ParamValue] = field(default_factory=dict)
    dtype: str = "bfloat16"
    output_name: str = ""
    private: bool = False


@dataclass(frozen=True)
class FormReading:
    """What the form shows for a YAML text: the form, or why it cannot show it."""

    form: MergeForm | None
    advanced: str | None = None  # why the recipe is YAML-only (gradients, filters, slices)


def per_model_params(method: str) -> tuple[ParamSpec, ...]:
    """Numbers the form asks for on each model row (weight, density, epsilon...)."""
    return tuple(
        p for p in METHODS[method].params if p.scope in (Scope.INPUT, Scope.NON_BASE) and p.kind != "bool"
    )


def shared_params(method: str) -> tuple[ParamSpec, ...]:
    """Numbers and switches set once for the merge (t, lambda, normalize...)."""
    hidden = {"int8_mask"}  # accepted for compatibility, no effect
    return tuple(p for p in METHODS[method].params if p.scope == Scope.SHARED and p.name not in hidden)


def form_to_recipe(form: MergeForm) -> dict[str, Any]:
    """The mergekit recipe (as a mapping) that the form describes."""
    spec = METHODS[form.method]
    per_model = {p.name for p in per_model_params(form.method)}
    models = []
    for row in form.models:
        entry: dict[str, Any] = {"model": row.model}
        params = {k: v for k, v in row.params.items() if k in per_model and v is not None}
        is_base = row.model == form.base_model
        if is_base:
            params = {k: v for k, v in params.items() if spec.param(k) and spec.param(k).scope == Scope.INPUT}  # type: ignore[union-attr]
        if params:
            entry["parameters"] = params
        models.append(entry)
    recipe: dict[str, Any] = {"merge_method": form.method}
    if form.base_model:
        recipe["base_model"] = form.base_model
    recipe["models"] = models
    shared = {
        p.name: form.shared[p.name]
        for p in shared_params(form.method)
        if p.name in form.shared and form.shared[p.name] is not None and form.shared[p.name] != p.default
    }
    if shared:
        recipe["parameters"] = shared
    recipe["dtype"] = form.dtype
    return recipe


def form_to_yaml(form: MergeForm) -> str:
    return yaml.safe_dump(form_to_recipe(form), sort_keys=False, default_flow_style=None)


def yaml_to_form(text: str, *, output_name: str = "", private: bool = False) -> FormReading:
    """Read a YAML recipe into the form.

    Raises:
        RecipeError: the YAML is not a valid recipe (with locations, as everywhere).
    """
    config = _validate_text(text)
    if config.slices:
        return FormReading(None, "this recipe uses `slices` (layer ranges); edit it as YAML")
    if config.modules:
        return FormReading(None, "this recipe merges each module its own way (`modules`); edit it as YAML")
    reasons = []
    rows = []
    for m in config.models or []:
        values: dict[str, ParamValue] = {}
        for name, setting in (m.parameters or {}).items():
            value = _plain_value(setting)
            if value is None:
                reasons.append(f"`{name}` of {m.model} varies by layer or tensor")
            else:
                values[name] = value
        rows.append(ModelRow(m.model, values))
    shared: dict[str, ParamValue] = {}
    for name, setting in (config.parameters or {}).items():
        value = _plain_value(setting)
        if value is None:
            reasons.append(f"`{name}` varies by layer or tensor")
        else:
            shared[name] = value
    if reasons:
        return FormReading(None, "; ".join(reasons) + ": edit it as YAML")
    form = MergeForm(
        method=config.merge_method,
        base_model=config.base_model,
        models=tuple(rows),
        shared=shared,
        dtype=config.dtype or "bfloat16",
        output_name=output_name,
        private=private,
    )
    return FormReading(form)


def _starting_value(spec: ParamSpec) -> ParamValue:
    """A value inside a required parameter's range, to start an example from."""
    if spec.kind == "bool":
        return False
    low = spec.minimum if spec.minimum is not None else 0.0
    high = spec.maximum if spec.maximum is not None else 1.0
    value = (low + high) / 2
    return int(value) if spec.kind == "int" else value


def _validate_text(text: str) -> MergeConfig:
    from engine import load_recipe

    return load_recipe(text if "\n" in text else text + "\n")


def _plain_value(setting: Any) -> ParamValue | None:
    """A setting's single value, or None when it is a gradient or filtered."""
    branches = setting.branches
    if len(branches) == 1 and branches[0].filter is None and len(branches[0].values) == 1:
        value: ParamValue = branches[0].values[0]
        return value
    return None


def validate_form(form: MergeForm) -> MergeConfig:
    """Validate the form through the same recipe validation as every other way in."""
    return validate_recipe(form_to_recipe(form))


def example_form(method: str, base: str, others: Sequence[str]) -> MergeForm:
    """A sensible starting point for ``method`` with the given models (for the examples menu)."""
    spec = METHODS[method]
    models = list(others)
    if spec.max_inputs is not None:
        models = models[: spec.max_inputs - (1 if spec.needs_base else 0)]
    rows = []
    n = max(1, len(models))
    for name in models:
        params: dict[str, ParamValue] = {}
        for p in per_model_params(method):
            if p.name == "weight":
                params["weight"] = round(1.0 / n, 3) if method in {"linear"} else 0.5
            elif p.name == "density":
                params["density"] = 0.5
            elif p.default is not None:
                params[p.name] = p.default
        rows.append(ModelRow(name, params))
    base_row = None
    if spec.needs_base or method == "linear":
        base_row = ModelRow(base, {"weight": round(1.0 / (n + 1), 3)} if method == "linear" else {})
    if method == "linear" and base_row is not None:
        rows = [replace(r, params={**r.params, "weight": round(1.0 / (n + 1), 3)}) for r in rows]
        rows.insert(0, base_row)
    elif method == "slerp" and base_row is not None:
        rows.insert(0, base_row)
    shared = {
        p.name: p.default if p.default is not None else _starting_value(p) for p in shared_params(method)
    }
    form = MergeForm(
        method=method,
        base_model=base if (spec.needs_base or method == "slerp") else None,
        models=tuple(rows),
        shared=shared,
    )
    try:
        validate_form(form)
    except RecipeError:
        raise
    return form


def example_search(base: str, others: Sequence[str], data: str) -> str:
    """An example search file for the Evolve tab: TIES weights and densities of ``others`` over ``base``."""
    models = ", ".join(others)
    return (
        "# An evolutionary search (CMA-ES) over a merge's coefficients; the best merge is published.\n"
        "method: ties\n"
        f"base_model: {base}\n"
        f"models: [{models}]\n"
        "parameters:               # searched: one value per model\n"
        "  weight: {min: 0.1, max: 1.0}\n"
        "  density: {min: 0.2, max: 1.0}\n"
        "dtype: bfloat16\n"
        "evaluation:               # data: a file in a Hub repo (hf://datasets/org/name/path or hf://org/name/path)\n"
        "  kind: perplexity\n"
        f"  data: {data}\n"
        "  search_size: 8\n"
        "  report_size: 8\n"
        "  validation_size: 8       # optional: the final recipe is the best on these of the\n"
        "  finalists: 3             # 3 best search trials and the baselines\n"
        "  block_size: 32\n"
        "budget: {trials: 4}\n"
        "baselines: [linear, ties]\n"
        "seed: 0\n"
    )
