"""Evolutionary merge search: CMA-ES over a method's declared parameters, merging in memory.

    from engine.evolve import load_search, run_search
    result = run_search(load_search("search.yml"), "out/")

See :mod:`engine.evolve.search` for the loop, :mod:`engine.evolve.space` for how the search
space is derived from the method's ParamSpecs, and :mod:`engine.evolve.inmemory` for why a
trial's merge equals ``run_merge`` of the recipe it reports.

Importing this package imports optuna and transformers (the ``evolve`` extra); the rest of the
engine never imports it.
"""

from engine.evolve.errors import EvaluationDataError, SearchFileError
from engine.evolve.inmemory import InMemoryMerger, ResidentCausalLM
from engine.evolve.search import SearchResult, TrialEvent, run_search
from engine.evolve.space import SearchSpace, baseline_recipe, build_space
from engine.evolve.spec import SearchSpec, load_search, validate_search

__all__ = [
    "EvaluationDataError",
    "InMemoryMerger",
    "ResidentCausalLM",
    "SearchFileError",
    "SearchResult",
    "SearchSpace",
    "SearchSpec",
    "TrialEvent",
    "baseline_recipe",
    "build_space",
    "load_search",
    "run_search",
    "validate_search",
]
