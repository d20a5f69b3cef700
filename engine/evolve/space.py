"""The search space, derived from the method's own parameter declarations (never a second table).

Each searched parameter becomes one dimension per model when the method declares it per model
(``Scope.INPUT``/``Scope.NON_BASE``: ``weight``, ``density``), or one dimension when it is shared
(``lambda``); ``layer_groups: G`` multiplies that by G. A point of the space is a recipe:

- per-model values go into each model's ``parameters``, shared ones into the top-level ``parameters``;
- G layer groups become a G-anchor gradient (``weight: [0.3, 0.7]``), which the plan interpolates
  linearly over depth as mergekit does; tensors outside the blocks (embeddings, final norm, head)
  take the first anchor.

Weights are not forced to sum to one: whether they are normalized is the method's ``normalize``.
Ranges default to the declared bounds of the parameter (``density``: (0, 1]); a parameter declared
without a bound (``weight``) needs ``min``/``max`` in the search file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from engine.config import MergeConfig, validate_recipe
from engine.evolve.spec import (
    PER_MODEL_SCOPES,
    SearchSpec,
    lower_bound,
    recipe_base,
    takes_value,
    upper_bound,
)
from engine.methods import METHODS
from engine.methods.base import MethodSpec

BASELINE_WEIGHT = 1.0  # "weight" for baselines whose method requires one (normalized by the method)


@dataclass(frozen=True)
class Dimension:
    """One coordinate of the space: a parameter, for one model (or all), in one layer group."""

    key: str  # the optuna parameter name, e.g. ``weight[1]@0``
    param: str
    model: int | None  # index into SearchSpec.models; None for a shared parameter
    group: int
    groups: int
    low: float
    high: float
    integer: bool
    log: bool

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def center(self) -> float:
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return float(round(mid)) if self.integer else mid


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a search and the map from a point to the recipe it stands for."""

    spec: SearchSpec
    dimensions: tuple[Dimension, ...]

    @property
    def method(self) -> MethodSpec:
        return METHODS[self.spec.method]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {d.key: d.distribution() for d in self.dimensions}

    def center(self) -> dict[str, float]:
        return {d.key: d.center() for d in self.dimensions}

    def label(self, dim: Dimension) -> str:
        """A column title for reports: ``weight ft1`` or ``density ft0 g2``."""
        who = f" {_short(self.spec.models[dim.model])}" if dim.model is not None else ""
        group = f" g{dim.group}" if dim.groups > 1 else ""
        return f"{dim.param}{who}{group}"

    def recipe_data(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe (as a mapping) for one point; every dimension must have a value."""
        missing = [d.key for d in self.dimensions if d.key not in values]
        if missing:
            raise KeyError(f"no value for {missing}")
        data = recipe_base(self.spec)
        shared: dict[str, Any] = dict(data.get("parameters", {}))
        per_model: list[dict[str, Any]] = [{} for _ in self.spec.models]
        for dim in self.dimensions:
            if dim.group:
                continue
            anchors = [
                values[d.key] for d in self.dimensions if d.param == dim.param and d.model == dim.model
            ]
            anchors = [int(v) if dim.integer else float(v) for v in anchors]
            setting: Any = anchors[0] if len(anchors) == 1 else anchors
            (per_model[dim.model] if dim.model is not None else shared)[dim.param] = setting
        if shared:
            data["parameters"] = shared
        data["models"] = [
            {"model": ref, "parameters": params} if params else {"model": ref}
            for ref, params in zip(self.spec.models, per_model, strict=True)
        ]
        return data

    def recipe(self, values: Mapping[str, Any]) -> MergeConfig:
        """The validated recipe for one point of the space."""
        return validate_recipe(self.recipe_data(values))


def build_space(spec: SearchSpec) -> SearchSpace:
    """Derive the dimensions of a validated search from its method's ParamSpecs."""
    method = spec.method_spec
    dims: list[Dimension] = []
    for pname, rng in spec.parameters.items():
        param = method.param(pname)
        assert param is not None  # validated by SearchSpec
        low, high = lower_bound(param, rng), upper_bound(param, rng)
        models: list[int | None] = [None]
        if param.scope in PER_MODEL_SCOPES:
            models = [i for i, m in enumerate(spec.models) if takes_value(method, param, m, spec.base_model)]
        for model in models:
            for group in range(rng.layer_groups):
                key = (
                    pname
                    + (f"[{model}]" if model is not None else "")
                    + (f"@{group}" if rng.layer_groups > 1 else "")
                )
                dims.append(
                    Dimension(
                        key, pname, model, group, rng.layer_groups, low, high, param.kind == "int", rng.log
                    )
                )
    return SearchSpace(spec, tuple(dims))


def baseline_recipe(spec: SearchSpec, name: str) -> MergeConfig:
    """A reference merge of the same models: ``linear`` (their plain average) or ``ties``.

    ``ties`` takes every parameter at its declared default, with weight 1 for each model (TIES
    normalizes, so this is the mean of the agreeing task vectors).
    """
    data: dict[str, Any] = {"merge_method": name, "random_seed": spec.seed}
    method = METHODS[name]
    if method.needs_base:
        data["base_model"] = spec.base_model
    required = [p for p in method.params_in(*PER_MODEL_SCOPES) if p.required]
    data["models"] = [
        {
            "model": m,
            "parameters": {
                p.name: BASELINE_WEIGHT for p in required if takes_value(method, p, m, spec.base_model)
            },
        }
        for m in spec.models
    ]
    for key in ("dtype", "out_dtype"):
        if getattr(spec, key) is not None:
            data[key] = getattr(spec, key)
    return validate_recipe(data)


def _short(ref: str) -> str:
    return ref.rstrip("/").split("/")[-1]
