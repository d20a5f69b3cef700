"""Parity of mergebot's engine with mergekit 0.1.5 (the oracle), method by method.

Each recipe is merged once by mergekit and once by mergebot, on tiny real models
(Llama, Qwen2, Mistral; bf16 and float32; tied/untied; sharded/single file), and
compared tensor by tensor. A float64 reference written from the papers' formulas
(and mergekit's documented conventions) decides who is right when they differ.

Tolerances:
- linear, slerp: within one ulp of the output dtype (bf16: rtol 2**-7), compared as float32.
- passthrough: bit-exact.
- task_arithmetic, ties (and DARE at density 1): mergekit does the task-vector math in the
  input dtype (bf16), mergebot in float32. Per tensor, the relative L2 difference must be
  <= 5e-3 *and* mergebot must be the closer of the two to the float64 reference (ties
  within float rounding, < 1e-6 relative, count as a draw).
- TIES trimming is ill-defined where magnitudes tie at the top-k cut (frequent in bf16,
  whose task vectors take few distinct values): such positions are left out of the
  comparison and their share is reported.
- DARE (random): statistics only: kept fraction ~= density; survivors rescaled so each
  task vector keeps its L1 norm (mergekit's convention), not by 1/density.

mergekit conventions these tests pin (found by running it, see the report):
- gradients: layer i of an N-layer slice is evaluated at t = i / (N - 1); tensors outside
  the layers (embed_tokens, model.norm, lm_head) at t = 0, i.e. the gradient's first value.
- filters are substring matches on the tensor name, first match wins, then the next scope.
- tied embeddings: no lm_head.weight is written.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from oracle import Recipe, load_tensors, read_json, recipe_dict, recipe_yaml, run_mergekit, weight_files
from tiny_models import Family

pytestmark = pytest.mark.oracle

SEED = 42
BF16_RTOL = 2.0**-7  # one bf16 ulp relative to the value, compared as float32
TASK_VECTOR_RTOL = 5e-3  # relative L2, bf16 (mergekit) vs float32 (mergebot) task-vector math
DRAW = 1e-6  # relative: both within float rounding of the reference

Record = Callable[[str, str, float], None]


# --- recipes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One recipe over one family; ``build`` turns the family's folders into the recipe."""

    id: str
    family: str  # a fixture name, or "distant:<arch>"
    build: Callable[[Family], dict[str, Any]]

    @property
    def method(self) -> str:
        return self.id.split("-")[0]


def _m(path: Path, **parameters: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(path)}
    if parameters:
        entry["parameters"] = parameters
    return entry


ATTN_MLP_DEFAULT = [  # the filter idiom from mergekit's README
    {"filter": "self_attn", "value": 0.3},
    {"filter": "mlp", "value": [0.1, 0.9]},
    {"value": 0.5},
]

CASES: tuple[Case, ...] = (
    # linear
    Case(
        "linear-llama-weights",
        "llama_family",
        lambda f: {
            "merge_method": "linear",
            "models": [
                _m(f.base, weight=0.5),
                _m(f.finetunes[0], weight=0.3),
                _m(f.finetunes[1], weight=0.2),
            ],
        },
    ),
    Case(
        "linear-qwen2-filters-gradient-nonorm",
        "qwen2_family",
        lambda f: {
            "merge_method": "linear",
            "models": [
                _m(f.finetunes[0], weight=ATTN_MLP_DEFAULT),
                _m(f.finetunes[1], weight=0.4),
                _m(f.finetunes[2], weight=[1.0, 0.2]),
            ],
            "parameters": {"normalize": False},
        },
    ),
    Case(
        "linear-mistral-toplevel-gradient-dtype",
        "mistral_family",
        lambda f: {
            "merge_method": "linear",
            "models": [_m(f.finetunes[0]), _m(f.finetunes[1])],
            "parameters": {"weight": [0.2, 0.8]},
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
    ),
    Case(
        "linear-qwen2f32-dtype-bf16",
        "qwen2_family_f32",
        lambda f: {
            "merge_method": "linear",
            "models": [_m(f.finetunes[0], weight=1.0), _m(f.finetunes[1], weight=3.0)],
            "dtype": "bfloat16",
        },
    ),
    # slerp
    Case(
        "slerp-llama-gradient",
        "distant:llama",
        lambda f: {
            "merge_method": "slerp",
            "base_model": str(f.base),
            "models": [_m(f.base), _m(f.finetunes[0])],
            "parameters": {"t": [0, 0.5, 1]},
        },
    ),
    Case(
        "slerp-qwen2-filters",
        "distant:qwen2",
        lambda f: {
            "merge_method": "slerp",
            "base_model": str(f.base),
            "models": [_m(f.base), _m(f.finetunes[0])],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "bfloat16",
        },
    ),
    Case(
        "slerp-mistral-near-collinear",
        "mistral_family",
        lambda f: {
            "merge_method": "slerp",
            "base_model": str(f.base),
            "models": [_m(f.base), _m(f.finetunes[0])],
            "parameters": {"t": 0.3},
        },
    ),
    Case(
        "slerp-llama-float32-out",
        "distant:llama",
        lambda f: {
            "merge_method": "slerp",
            "base_model": str(f.finetunes[0]),
            "models": [_m(f.base), _m(f.finetunes[0])],
            "parameters": {"t": 0.25},
            "dtype": "float32",
        },
    ),
    # task arithmetic
    Case(
        "task_arithmetic-llama-negative-lambda",
        "llama_family",
        lambda f: {
            "merge_method": "task_arithmetic",
            "base_model": str(f.base),
            "models": [
                _m(f.finetunes[0], weight=1.0),
                _m(f.finetunes[1], weight=-0.5),
                _m(f.finetunes[2], weight=0.75),
            ],
            "parameters": {"lambda": 0.8},
        },
    ),
    Case(
        "task_arithmetic-qwen2-filters-normalize",
        "qwen2_family",
        lambda f: {
            "merge_method": "task_arithmetic",
            "base_model": str(f.base),
            "models": [
                _m(f.finetunes[0], weight=ATTN_MLP_DEFAULT),
                _m(f.finetunes[1], weight=[0.25, 1.0]),
                _m(f.finetunes[2], weight=0.5),
            ],
            "parameters": {"normalize": True},
        },
    ),
    Case(
        "task_arithmetic-mistral-dtype-f32",
        "mistral_family",
        lambda f: {
            "merge_method": "task_arithmetic",
            "base_model": str(f.base),
            "models": [_m(f.finetunes[0], weight=0.7), _m(f.finetunes[1], weight=0.6)],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
    ),
    Case(
        "task_arithmetic-qwen2f32",
        "qwen2_family_f32",
        lambda f: {
            "merge_method": "task_arithmetic",
            "base_model": str(f.base),
            "models": [_m(p, weight=0.5) for p in f.finetunes],
        },
    ),
    # TIES
    Case(
        "ties-llama-density",
        "llama_family",
        lambda f: {
            "merge_method": "ties",
            "base_model": str(f.base),
            "models": [
                _m(f.finetunes[0], weight=1.0, density=0.5),
                _m(f.finetunes[1], weight=0.5, density=0.7),
                _m(f.finetunes[2], weight=0.75, density=0.3),
            ],
        },
    ),
    Case(
        "ties-qwen2-density-gradient-nonorm-lambda",
        "qwen2_family",
        lambda f: {
            "merge_method": "ties",
            "base_model": str(f.base),
            "models": [
                _m(f.finetunes[0], weight=ATTN_MLP_DEFAULT),
                _m(f.finetunes[1], weight=1.0),
                _m(f.finetunes[2], weight=0.5, density=0.8),
            ],
            "parameters": {"density": [0.3, 0.9], "normalize": False, "lambda": 1.25},
        },
    ),
    Case(
        "ties-mistral-density1-negative",
        "mistral_family",
        lambda f: {
            "merge_method": "ties",
            "base_model": str(f.base),
            "models": [
                _m(f.finetunes[0], weight=1.0),
                _m(f.finetunes[1], weight=-0.5),
                _m(f.finetunes[2], weight=0.75),
            ],
            "parameters": {"density": 1.0},
        },
    ),
    Case(
        "ties-llamaf32-density",
        "llama_family_f32",
        lambda f: {
            "merge_method": "ties",
            "base_model": str(f.base),
            "models": [_m(p, weight=w) for p, w in zip(f.finetunes, (0.6, 0.4, 0.5), strict=True)],
            "parameters": {"density": 0.4},
        },
    ),
    # DARE at density 1 is deterministic: exact parity is checkable
    Case(
        "dare_linear-llama-density1",
        "llama_family",
        lambda f: {
            "merge_method": "dare_linear",
            "base_model": str(f.base),
            "models": [
                _m(f.finetunes[0], weight=1.0),
                _m(f.finetunes[1], weight=-0.5),
                _m(f.finetunes[2], weight=0.75),
            ],
            "parameters": {"density": 1.0},
        },
    ),
    Case(
        "dare_ties-qwen2-density1",
        "qwen2_family",
        lambda f: {
            "merge_method": "dare_ties",
            "base_model": str(f.base),
            "models": [
                _m(p, weight=w, density=1.0) for p, w in zip(f.finetunes, (1.0, 0.5, 0.75), strict=True)
            ],
        },
    ),
)

TASK_VECTOR_METHODS = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}


# --- running both tools once per recipe -------------------------------------------------------


class Merges:
    """Each recipe merged at most once per tool per session (outputs are pure functions of inputs)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._done: dict[tuple[str, str, int], Path] = {}

    def _out(self, tool: str, recipe: Recipe, seed: int) -> tuple[tuple[str, str, int], Path]:
        key = (tool, recipe_yaml(recipe), seed)
        return key, self._root / f"{tool}-{len(self._done):03d}"

    def mergekit(self, recipe: Recipe, *, seed: int = SEED) -> Path:
        key, out = self._out("mergekit", recipe, seed)
        if key not in self._done:
            self._done[key] = run_mergekit(recipe, out, seed=seed)
        return self._done[key]

    def mergebot(self, recipe: Recipe, *, seed: int = SEED) -> Path:
        key, out = self._out("mergebot", recipe, seed)
        if key not in self._done:
            self._done[key] = run_mergebot(recipe, out, seed=seed)
        return self._done[key]


def run_mergebot(recipe: Recipe, out_dir: Path, *, seed: int = SEED) -> Path:
    """Merge with mergebot's Python API (imported lazily: the engine may not exist yet)."""
    from engine import MergeOptions, load_recipe, run_merge

    run_merge(load_recipe(recipe_yaml(recipe)), out_dir, options=MergeOptions(seed=seed))
    return out_dir


@pytest.fixture(scope="session")
def merges(tmp_path_factory: pytest.TempPathFactory) -> Merges:
    return Merges(tmp_path_factory.mktemp("merges"))


def family_for(request: pytest.FixtureRequest, name: str) -> Family:
    if name.startswith("distant:"):
        factory: Callable[[str], Family] = request.getfixturevalue("distant_pair")
        return factory(name.split(":", 1)[1])
    family: Family = request.getfixturevalue(name)
    return family


# --- the recipe's meaning, in float64 ------------------------------------------------------------

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_t(name: str, num_layers: int) -> float:
    """Where a tensor sits on a gradient: i/(N-1) for layer i; 0 outside the layers (mergekit's choice)."""
    match = _LAYER.search(name)
    if match is None:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """A parameter setting at one tensor: scalar, gradient (piecewise linear in t), or filter list."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(c, dict) for c in setting):
            for cond in setting:
                flt = cond.get("filter")
                if flt is None or flt == "*" or flt in tensor:
                    return evaluate(cond["value"], tensor, t)
            return None
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def parameter(
    recipe: dict[str, Any], model: dict[str, Any] | None, name: str, tensor: str, t: float, default: Any
) -> Any:
    """Per-model parameters win over top-level ones; a filter list with no match falls through."""
    scopes = [model.get("parameters") if model else None, recipe.get("parameters")]
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor, t)
            if value is not None:
                return value
    if default is None:
        raise KeyError(f"{name} is required for {tensor}")
    return default


def topk_masks(magnitude: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES trimming: (kept, ambiguous) masks for keeping the top k = max(1, int(density*numel)).

    An element is ambiguous when a different, equally valid choice could drop or keep it:
    its magnitude ties with others across the cut, or k itself sits on a float rounding
    boundary (density from a gradient such as 0.3 + 0.6/3 = 0.49999999999999994).
    """
    flat = magnitude.flatten()
    n = flat.numel()
    k_float = density * n
    k_lo, k_hi = max(1, int(k_float - 1e-6)), max(1, int(k_float + 1e-6))
    ascending = flat.sort().values
    n_ge = n - torch.searchsorted(ascending, flat, side="left")  # elements >= this one
    n_gt = n - torch.searchsorted(ascending, flat, side="right")  # elements > this one
    surely_kept = n_ge <= k_lo
    surely_dropped = n_gt >= k_hi
    return surely_kept.reshape(magnitude.shape), (~surely_kept & ~surely_dropped).reshape(magnitude.shape)


def slerp64(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation over the whole flattened tensor; linear when nearly collinear."""
    na, nb = a.norm(), b.norm()
    dot = ((a / (na if na > 1e-8 else 1)) * (b / (nb if nb > 1e-8 else 1))).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


@dataclass(frozen=True)
class Expected:
    value: torch.Tensor  # float64, not rounded to the output dtype
    ambiguous: torch.Tensor  # bool: positions where valid implementations may differ


DEFAULT_NORMALIZE = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
}


def expected_tensor(
    recipe: dict[str, Any], inputs: dict[str, dict[str, torch.Tensor]], name: str, num_layers: int
) -> Expected:
    """The float64 result the recipe asks for at tensor ``name`` (models: {path: tensors})."""
    method = recipe["merge_method"]
    t = layer_t(name, num_layers)
    compute = _dtype(recipe.get("dtype"))

    def load(path: str) -> torch.Tensor:
        x = inputs[path][name]
        return (x.to(compute) if compute else x).double()

    models = recipe["models"]
    nothing = torch.zeros(load(models[0]["model"]).shape, dtype=torch.bool)
    normalize = parameter(recipe, None, "normalize", name, t, DEFAULT_NORMALIZE.get(method, False))
    if method == "linear":
        xs = [load(m["model"]) for m in models]
        ws = [parameter(recipe, m, "weight", name, t, None) for m in models]
        total = sum(w * x for w, x in zip(ws, xs, strict=True))
        return Expected(total / sum(ws) if normalize else total, nothing)
    if method == "slerp":
        base = recipe["base_model"]
        other = next(m for m in models if m["model"] != base)
        return Expected(
            slerp64(parameter(recipe, None, "t", name, t, None), load(base), load(other["model"])), nothing
        )
    if method in TASK_VECTOR_METHODS:
        return _task_vectors(recipe, method, load, name, t, normalize)
    raise ValueError(f"no float64 reference for {method}")


def _task_vectors(
    recipe: dict[str, Any],
    method: str,
    load: Callable[[str], torch.Tensor],
    name: str,
    t: float,
    normalize: bool,
) -> Expected:
    """base + lambda * (sum w_i d_i) [/ sum of the weights that took part], d_i = model_i - base."""
    base = load(recipe["base_model"])
    entries = [m for m in recipe["models"] if m["model"] != recipe["base_model"]]
    ambiguous = torch.zeros(base.shape, dtype=torch.bool)
    weighted, weights = [], []
    for entry in entries:
        delta = load(entry["model"]) - base
        weight = float(parameter(recipe, entry, "weight", name, t, None))
        density = float(parameter(recipe, entry, "density", name, t, 1.0))
        if method == "ties" and density < 1:
            kept, unsure = topk_masks(delta.abs(), density)
            delta = delta * kept
            ambiguous |= unsure
        elif method.startswith("dare") and density < 1:
            raise ValueError("DARE below density 1 is random: no deterministic reference")
        weighted.append(weight * delta)
        weights.append(torch.full_like(base, weight))
    wd = torch.stack(weighted)  # [models, *shape]
    w = torch.stack(weights)
    if method in {"ties", "dare_ties"}:
        votes = wd.sum(dim=0)
        elected = torch.where(votes >= 0, 1.0, -1.0).double()
        agree = wd.sign() == elected
        # a vote within float rounding of zero may be elected either way
        ambiguous |= (votes.abs() <= 1e-6 * wd.abs().sum(dim=0)) & (wd != 0).any(dim=0)
        mixed = (wd * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    lam = float(parameter(recipe, None, "lambda", name, t, 1.0))
    return Expected(base + lam * mixed, ambiguous)


def _dtype(name: str | None) -> torch.dtype | None:
    return {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def output_dtype(recipe: dict[str, Any], input_dtype: torch.dtype) -> torch.dtype:
    """out_dtype, else dtype, else the inputs' dtype."""
    return _dtype(recipe.get("out_dtype")) or _dtype(recipe.get("dtype")) or input_dtype


def rel_l2(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """||x - y|| / ||y|| in float64, over ``mask`` if given."""
    x, y = x.double(), y.double()
    if mask is not None:
        x, y = x[mask], y[mask]
    denominator = y.norm().item()
    return (x - y).norm().item() / denominator if denominator > 0 else (x - y).norm().item()


def family_inputs(family: Family) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p): load_tensors(p) for p in family.models}


# --- oracle self-check: mergekit against the float64 reading of the recipe --------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_oracle_matches_float64_reference(
    case: Case, request: pytest.FixtureRequest, merges: Merges, parity_report: Record
) -> None:
    """mergekit agrees with our float64 reading of the recipe (validates the reference, not mergebot)."""
    family = family_for(request, case.family)
    recipe = case.build(family)
    mk = load_tensors(merges.mergekit(recipe))
    inputs = family_inputs(family)
    out_dtype = output_dtype(recipe, family.spec.torch_dtype)
    for name, got in mk.items():
        assert got.dtype == out_dtype, name
        exp = expected_tensor(recipe, inputs, name, family.spec.num_layers)
        rounded = exp.value.to(out_dtype)
        keep = ~exp.ambiguous
        # figure: error beyond storing the exact result in the output dtype
        parity_report(f"{case.method} mergekit~f64", f"{case.id}:{name}", rel_l2(got, rounded, keep))
        if case.method in TASK_VECTOR_METHODS:
            rel = rel_l2(got, exp.value, keep)
            assert rel <= TASK_VECTOR_RTOL, f"{case.id} {name}: mergekit vs float64 reference {rel:.3e}"
        else:
            _assert_within_ulp(got, rounded, f"{case.id} {name} (mergekit vs float64)")


def _assert_within_ulp(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    if got.dtype == torch.bfloat16:
        rtol, atol = BF16_RTOL, 1e-5
    else:
        rtol, atol = 1e-5, 1e-6
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")


# --- mergebot against mergekit ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parity(case: Case, request: pytest.FixtureRequest, merges: Merges, parity_report: Record) -> None:
    """Same tensors, dtypes and layer count as mergekit, within the method's tolerance."""
    family = family_for(request, case.family)
    recipe = case.build(family)
    mk_dir = merges.mergekit(recipe)
    ours_dir = merges.mergebot(recipe)
    mk, ours = load_tensors(mk_dir), load_tensors(ours_dir)
    assert sorted(ours) == sorted(mk), "tensor names differ from mergekit's"
    mk_cfg, ours_cfg = read_json(mk_dir / "config.json"), read_json(ours_dir / "config.json")
    assert ours_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]
    assert ours_cfg.get("tie_word_embeddings") == mk_cfg.get("tie_word_embeddings")
    assert (ours_dir / "tokenizer.json").exists(), "tokenizer not copied"
    assert (ours_dir / "mergekit_config.yml").exists(), "recipe not written"

    inputs = family_inputs(family) if case.method in TASK_VECTOR_METHODS else {}
    failures = []
    for name in sorted(mk):
        a, b = ours[name], mk[name]
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} (mergebot) vs {b.dtype} (mergekit)"
        if case.method in TASK_VECTOR_METHODS:
            exp = expected_tensor(recipe, inputs, name, family.spec.num_layers)
            problem = _task_vector_problem(a, b, exp, f"{case.id}:{name}", case.method, parity_report)
            if problem:
                failures.append(f"{name}: {problem}")
        else:
            parity_report(f"{case.method} mergebot~mergekit", f"{case.id}:{name}", rel_l2(a, b))
            try:
                _assert_within_ulp(a, b, name)
            except AssertionError as exc:
                failures.append(str(exc).splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:4]))
    assert not failures, f"{case.id}: {len(failures)} tensors out of tolerance:\n" + "\n".join(failures)


def _task_vector_problem(
    ours: torch.Tensor, mk: torch.Tensor, exp: Expected, where: str, method: str, record: Record
) -> str | None:
    """None if mergebot is within 5e-3 (relative L2) of mergekit and no farther than it from float64."""
    keep = ~exp.ambiguous
    rel = rel_l2(ours, mk, keep)
    share = exp.ambiguous.double().mean().item()
    record(f"{method} mergebot~mergekit", f"{where} (ambiguous {share:.1%})", rel)
    ref_norm = exp.value[keep].norm().item()
    err_ours = (ours.double() - exp.value)[keep].norm().item()
    err_mk = (mk.double() - exp.value)[keep].norm().item()
    record(f"{method} mergebot~f64", where, rel_l2(ours, exp.value.to(ours.dtype), keep))
    if rel > TASK_VECTOR_RTOL:
        return f"relative L2 vs mergekit {rel:.3e} > {TASK_VECTOR_RTOL}"
    if err_ours > err_mk + DRAW * ref_norm:
        return (
            f"farther from the float64 reference than mergekit: {err_ours / ref_norm:.3e} vs "
            f"{err_mk / ref_norm:.3e} (relative L2)"
        )
    return None


# --- passthrough frankenmerges -----------------------------------------------------------------


@dataclass(frozen=True)
class Frankenmerge:
    id: str
    family: str
    slices: tuple[tuple[int, int, int], ...]  # (model index in family.models, start, end)


FRANKENMERGES = (
    Frankenmerge("llama-overlap", "llama_family", ((1, 0, 3), (2, 1, 4))),
    Frankenmerge("mistral-three-slices", "mistral_family", ((1, 0, 4), (3, 2, 6), (0, 5, 6))),
    Frankenmerge("qwen2-tied-layer_types", "qwen2_family", ((1, 0, 3), (2, 1, 4))),
)


def frankenmerge_recipe(family: Family, fm: Frankenmerge) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "dtype": family.spec.dtype,
        "slices": [
            {"sources": [{"model": str(family.models[i]), "layer_range": [start, end]}]}
            for i, start, end in fm.slices
        ],
    }


def frankenmerge_expected(family: Family, fm: Frankenmerge) -> dict[str, torch.Tensor]:
    """The recipe's meaning: output layer j is the j-th layer the slices name, in order; tensors
    outside the layers come from the first slice's model (embeddings) or the last's (final norm,
    lm_head), as in mergekit."""
    tensors = {i: load_tensors(family.models[i]) for i, _, _ in fm.slices}
    first, last = tensors[fm.slices[0][0]], tensors[fm.slices[-1][0]]
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": first["model.embed_tokens.weight"]}
    out["model.norm.weight"] = last["model.norm.weight"]
    if "lm_head.weight" in last:
        out["lm_head.weight"] = last["lm_head.weight"]
    j = 0
    for i, start, end in fm.slices:
        for src in range(start, end):
            prefix = f"model.layers.{src}."
            for name, value in tensors[i].items():
                if name.startswith(prefix):
                    out[f"model.layers.{j}." + name[len(prefix) :]] = value
            j += 1
    return out


@pytest.mark.parametrize("fm", FRANKENMERGES, ids=lambda f: f.id)
def test_passthrough_frankenmerge(fm: Frankenmerge, request: pytest.FixtureRequest, merges: Merges) -> None:
    """Overlapping slices from several models: bit-exact layers, new layer count, loads and runs.

    mergekit 0.1.5 cannot write a Qwen2 frankenmerge under transformers 5: it sets
    num_hidden_layers but leaves ``layer_types`` at the old length, and transformers'
    config validation rejects that. Where mergekit fails, mergebot is checked against the
    recipe's meaning alone (which it is always checked against): output layer j equals the
    source layer the slices name, and ``layer_types`` has the new length.
    """
    family = family_for(request, fm.family)
    recipe = frankenmerge_recipe(family, fm)
    n_layers = sum(end - start for _, start, end in fm.slices)
    ours_dir = merges.mergebot(recipe)
    ours = load_tensors(ours_dir)
    want = frankenmerge_expected(family, fm)
    cfg = read_json(ours_dir / "config.json")
    tied = bool(cfg.get("tie_word_embeddings"))
    expected_names = sorted(n for n in want if not (tied and n == "lm_head.weight"))
    assert sorted(ours) == expected_names
    for name in expected_names:
        assert ours[name].dtype == want[name].dtype, name
        assert torch.equal(ours[name], want[name]), f"{name} is not the source tensor the slices name"
    assert cfg["num_hidden_layers"] == n_layers
    if "layer_types" in read_json(family.base / "config.json"):
        assert len(cfg["layer_types"]) == n_layers, "layer_types must follow the new layer count"

    try:
        mk_dir = merges.mergekit(recipe)
    except Exception as exc:  # mergekit's failure is documented above, not ours to fix
        assert "layer_types" in str(exc), f"mergekit failed for another reason: {exc!r}"
    else:
        mk = load_tensors(mk_dir)
        assert sorted(mk) == sorted(ours)
        for name in mk:
            assert torch.equal(ours[name], mk[name]), f"{name} differs from mergekit"
        assert read_json(mk_dir / "config.json")["num_hidden_layers"] == n_layers

    _forward_pass(ours_dir, n_layers)


def _forward_pass(folder: Path, n_layers: int) -> None:
    """The merged folder loads with transformers (weights and tokenizer) and gives finite logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(model.model.layers) == n_layers
    ids = tokenizer("the cat sat on the mat", return_tensors="pt")
    assert ids["input_ids"].shape[1] > 0
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


# --- DARE: random, so statistics --------------------------------------------------------------


def dare_recipe(family: Family, method: str, weight: float, density: float) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(family.base),
        "models": [_m(family.finetunes[0], weight=weight, density=density)],
    }


@pytest.mark.parametrize("tool", ["mergekit", "mergebot"])
@pytest.mark.parametrize(
    ("method", "weight", "density"),
    [("dare_linear", 1.0, 0.3), ("dare_ties", 0.8, 0.6)],
    ids=["linear", "ties"],
)
def test_dare_keeps_density_and_l1_norm(
    tool: str, method: str, weight: float, density: float, llama_family_f32: Family, merges: Merges
) -> None:
    """Kept share ~= density; survivors = weight * delta * sum|delta| / sum|kept delta| (L1-preserving).

    One fine-tune in float32, so the mask is readable from the output (out != base). Run on
    mergekit too: that pins the convention the engine must follow. dare_ties uses weight 0.8
    to show it does not normalize by default.
    """
    family = llama_family_f32
    recipe = dare_recipe(family, method, weight, density)
    out = load_tensors(merges.mergekit(recipe) if tool == "mergekit" else merges.mergebot(recipe))
    base, ft = load_tensors(family.base), load_tensors(family.finetunes[0])
    total = kept_total = 0
    distinguishable = 0
    for name in sorted(out):
        delta = (ft[name] - base[name]).double()
        moved = out[name].double() - base[name].double()
        kept = out[name] != base[name]
        n, n_kept = kept.numel(), int(kept.sum())
        total, kept_total = total + n, kept_total + n_kept
        sigma = (density * (1 - density) / n) ** 0.5
        assert abs(n_kept / n - density) <= 5 * sigma, f"{name}: kept {n_kept / n:.3f}, density {density}"
        l1_rescale = delta.abs().sum() / delta[kept].abs().sum()
        want = weight * l1_rescale * delta * kept
        # out is float32: allow its rounding (a few ulps of |base|, |out|) on top of 1e-5 relative
        slack = 1e-5 * want.abs() + 4 * 2.0**-24 * (base[name].double().abs() + out[name].double().abs())
        bad = (moved - want).abs() > slack
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} survivors not scaled by weight * sum|d|/sum|kept d| = "
            f"{weight * l1_rescale.item():.5f} (1/density would be {weight / density:.5f}); "
            f"observed ratio median {(moved[kept] / delta[kept]).median().item():.5f}"
        )
        distinguishable += abs(l1_rescale.item() - 1 / density) > 1e-2
    sigma = (density * (1 - density) / total) ** 0.5
    assert abs(kept_total / total - density) <= 4 * sigma
    assert distinguishable > len(out) // 2, "too few tensors tell the L1 rescale from 1/density"


@pytest.mark.parametrize(
    ("dare", "deterministic", "normalize"),
    [("dare_linear", "task_arithmetic", False), ("dare_ties", "ties", True), ("dare_ties", "ties", False)],
)
def test_dare_at_density_one_is_deterministic_method(
    dare: str, deterministic: str, normalize: bool, qwen2_family: Family, merges: Merges
) -> None:
    """dare_linear(d=1) == task_arithmetic and dare_ties(d=1) == ties(d=1), bit for bit."""
    models = [_m(p, weight=w) for p, w in zip(qwen2_family.finetunes, (1.0, -0.5, 0.75), strict=True)]
    recipes = [
        {
            "merge_method": method,
            "base_model": str(qwen2_family.base),
            "models": models,
            "parameters": {"density": 1.0, "normalize": normalize},
        }
        for method in (dare, deterministic)
    ]
    a, b = (load_tensors(merges.mergebot(r)) for r in recipes)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- reproducibility and the command line --------------------------------------------------------


def test_same_seed_same_bytes(qwen2_family: Family, tmp_path: Path) -> None:
    """Same recipe and seed: byte-identical shards and index; another seed: other DARE masks."""
    recipe = {
        "merge_method": "dare_ties",
        "base_model": str(qwen2_family.base),
        "models": [_m(p, weight=0.5, density=0.5) for p in qwen2_family.finetunes],
    }
    first = run_mergebot(recipe, tmp_path / "a", seed=7)
    second = run_mergebot(recipe, tmp_path / "b", seed=7)
    other = run_mergebot(recipe, tmp_path / "c", seed=8)
    files = [p.name for p in weight_files(first)]
    assert files == [p.name for p in weight_files(second)]
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    index = "model.safetensors.index.json"
    if (first / index).exists():
        assert (first / index).read_bytes() == (second / index).read_bytes()
    a, c = load_tensors(first), load_tensors(other)
    assert any(not torch.equal(a[n], c[n]) for n in a), "seed has no effect on DARE"


def test_cli_merge_matches_mergekit(llama_family: Family, tmp_path: Path, merges: Merges) -> None:
    """`python -m mergebot merge RECIPE OUT --seed N --device cpu` writes what the API does."""
    case = next(c for c in CASES if c.id == "linear-llama-weights")
    recipe = case.build(llama_family)
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(recipe_yaml(recipe), encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergebot",
            "merge",
            str(recipe_path),
            str(out),
            "--seed",
            "3",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, mk = load_tensors(out), load_tensors(merges.mergekit(recipe))
    assert sorted(ours) == sorted(mk)
    for name in mk:
        _assert_within_ulp(ours[name], mk[name], name)
    written = yaml.safe_load((out / "mergekit_config.yml").read_text(encoding="utf-8"))
    assert written["merge_method"] == "linear"
    assert [m["model"] for m in written["models"]] == [m["model"] for m in recipe_dict(recipe)["models"]]
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"] == 4
