"""mergebot's merge engine: mergekit recipes in, sharded safetensors out, one tensor at a time.

Usable on its own::

    from engine import load_recipe, run_merge, MergeOptions
    run_merge(load_recipe("recipe.yml"), "out/", options=MergeOptions(seed=0))
"""

from engine.check import Audit, ModelReport, audit_models, raise_for_audit
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
from engine.run import MergeOptions, MergeResult, OpenModels, plan_merge, run_merge
from engine.sources.hub import parse_hub_reference

__all__ = [
    "METHODS",
    "Audit",
    "IncompatibleModelsError",
    "MergeConfig",
    "MergeError",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "ModelNotFoundError",
    "ModelReport",
    "OpenModels",
    "OutputError",
    "RecipeError",
    "SafetensorsFormatError",
    "UnsafeWeightsError",
    "audit_models",
    "build_plan",
    "get_method",
    "load_recipe",
    "parse_hub_reference",
    "plan_merge",
    "raise_for_audit",
    "run_merge",
    "validate_recipe",
]
