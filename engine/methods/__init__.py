"""The merge methods, registered by their mergekit names."""

from __future__ import annotations

import difflib

from engine.errors import RecipeError
from engine.methods import (
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    spectral,
    task_arithmetic,
)
from engine.methods.base import MergeCall, MethodSpec, ParamSpec, Scope

__all__ = ["METHODS", "MergeCall", "MethodSpec", "ParamSpec", "Scope", "all_param_names", "get_method"]

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        linear.SPEC,
        slerp.SPEC,
        *task_arithmetic.SPECS,
        passthrough.SPEC,
        nuslerp.SPEC,
        multislerp.SPEC,
        karcher.SPEC,
        model_stock.SPEC,
        sce.SPEC,
        nearswap.SPEC,
        arcee_fusion.SPEC,
        *ram.SPECS,
        *spectral.SPECS,
    )
}


def get_method(name: str, location: str = "merge_method") -> MethodSpec:
    """Look a method up by name.

    Raises:
        RecipeError: unknown name, with the closest match and the list of valid names.
    """
    spec = METHODS.get(name)
    if spec is not None:
        return spec
    raise RecipeError.single(location, unknown_method_message(name))


def unknown_method_message(name: str) -> str:
    close = difflib.get_close_matches(str(name), METHODS, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown merge method '{name}'.{hint} Known methods: {', '.join(sorted(METHODS))}."


def all_param_names() -> set[str]:
    """Names any method accepts; a recipe may carry these for another method without error."""
    return {p.name for spec in METHODS.values() for p in spec.params} | {"density", "t", "weight", "scale"}
