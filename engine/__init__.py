"""mergebot's merge engine: mergekit recipes in, sharded safetensors out, one tensor at a time.

Usable on its own::

    from engine import load_recipe, run_merge, MergeOptions
    run_merge(load_recipe("recipe.yml"), "out/", options=MergeOptions(seed=0))
"""

from engine.check import ModelReport, audit_models
from engine.config import MergeConfig, load_recipe, validate_recipe
from engine.errors import (
    IncompatibleModelsError,
    MergeError,
    ModelNotFoundError,
    OutputError,
    RecipeError,
    SafetensorsFormatError,
    UnsafeWeightsError,
)
from engine.methods import METHODS, get_method
from engine.plan import MergePlan, build_plan
from engine.run import MergeOptions, MergeResult, plan_merge, run_merge

__all__ = [
    "METHODS",
    "IncompatibleModelsError",
    "MergeConfig",
    "MergeError",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "ModelNotFoundError",
    "ModelReport",
    "OutputError",
    "RecipeError",
    "SafetensorsFormatError",
    "UnsafeWeightsError",
    "audit_models",
    "build_plan",
    "get_method",
    "load_recipe",
    "plan_merge",
    "run_merge",
    "validate_recipe",
]
