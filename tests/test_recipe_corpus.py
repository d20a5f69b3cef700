"""Real-world recipe shapes, parsed by mergebot and by mergekit 0.1.5, which must agree.

Each shape is written here from the public formats (model cards and repos of well-known
merges: stacked frankenmerges, SLERP blends with attention/MLP gradients, TIES/DARE soups,
vision-language models merged per module, mergekit-multi files...), with made-up model ids.

mergekit is the oracle: it accepts a recipe when its schema validates it and the checks it
makes before reading any tensor pass (the method exists, each output group has the inputs
the method takes, every required parameter resolves, the dtypes are known). mergebot must
accept exactly those, and refuse the others, except for the documented differences in
``DIFFERENCES`` (each one also listed in docs/differences.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from oracle import load_tensors, run_mergekit
from tiny_models import Family

from engine import MergeOptions, run_merge
from engine.config import load_recipe
from engine.errors import RecipeError

# What each documented difference is; the corpus says which shapes show it.
DIFFERENCES = {
    "model-prefix": "`tokenizer_source: model:<id>` (removed syntax) is refused with the fix; "
    "mergekit fails when it reads the tokenizer",
    "module-name": "a module name mergebot does not know is refused at once; mergekit fails "
    "when it looks the module up in the model's architecture",
    "dtype-alias": "dtype aliases (fp16, bf16, half...) are accepted; mergekit fails at run time",
}


@dataclass(frozen=True)
class Shape:
    id: str
    text: str
    notes: tuple[str, ...] = ()  # substrings that some note must contain (mergebot accepts)
    refusal: str | None = None  # a substring of mergebot's refusal (mergebot refuses)
    difference: str | None = None  # a key of DIFFERENCES: the tools disagree, on purpose


S = Shape
CORPUS: tuple[Shape, ...] = (
    S(
        "slerp-gradients-filters",
        """
slices:
  - sources:
      - model: org/hermes-7b
        layer_range: [0, 32]
      - model: org/neural-chat-7b
        layer_range: [0, 32]
merge_method: slerp
base_model: org/hermes-7b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    ),
    S(
        "slerp-embed-slerp",
        """
merge_method: slerp
base_model: org/a-7b
models:
  - model: org/a-7b
  - model: org/b-7b
parameters:
  t: 0.5
  embed_slerp: true
dtype: float16
""",
        notes=("parameter 'embed_slerp' has no effect",),
    ),
    S(
        "slerp-models-float32",
        """
models:
  - model: org/miqu-70b
  - model: org/midnight-rose-70b
merge_method: slerp
base_model: org/miqu-70b
parameters:
  t: [0, 0.5, 1, 0.5, 0]
dtype: float32
out_dtype: bfloat16
""",
    ),
    S(
        "slerp-slice-base-not-a-source",
        """
merge_method: slerp
slices:
  - sources:
      - model: org/b-7b
        layer_range: [0, 32]
      - model: org/c-7b
        layer_range: [0, 32]
    base_model: org/a-7b
parameters: {t: 0.5}
""",
        refusal="the slice's base_model 'org/a-7b' is not among its sources ('org/b-7b', 'org/c-7b')",
    ),
    S(
        "slerp-three-models",
        """
merge_method: slerp
base_model: org/a
models: [{model: org/a}, {model: org/b}, {model: org/c}]
parameters: {t: 0.5}
""",
        refusal="slerp takes at most 2 models",
    ),
    S(
        "slerp-no-t",
        """
merge_method: slerp
base_model: org/a
models: [{model: org/a}, {model: org/b}]
""",
        refusal="needs `t`",
    ),
    S(
        "linear-soup-normalize",
        """
models:
  - model: org/wizard-13b
    parameters:
      weight: 0.4
  - model: org/vicuna-13b
    parameters:
      weight: 0.35
  - model: org/orca-13b
    parameters:
      weight: 0.25
merge_method: linear
parameters:
  normalize: true
dtype: float16
""",
    ),
    S(
        "linear-nomalize-typo",
        """
merge_method: linear
models:
  - model: org/a
    parameters: {weight: 0.5}
  - model: org/b
    parameters: {weight: 0.5}
parameters:
  nomalize: true
""",
        notes=("parameter 'nomalize' has no effect (did you mean 'normalize'?)",),
    ),
    S(
        "linear-weight-outside-parameters",
        """
merge_method: linear
models:
  - model: org/a
    weight: 0.5
  - model: org/b
    weight: 0.5
""",
        refusal="needs `weight`",
    ),
    S(
        "linear-density-carried-over",
        """
merge_method: linear
models:
  - model: org/a
    parameters: {weight: 1.0, density: 0.5}
  - model: org/b
    parameters: {weight: 1.0, density: 0.5}
""",
        notes=("parameter 'density' has no effect with linear",),
    ),
    S(
        "linear-no-weights",
        "merge_method: linear\nmodels: [{model: org/a}, {model: org/b}]\n",
        refusal="needs `weight`",
    ),
    S(
        "ties-int8-mask",
        """
models:
  - model: org/mistral-7b-base
  - model: org/openhermes-7b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: org/dolphin-7b
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: org/mistral-7b-base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
""",
    ),
    S(
        "ties-no-base",
        "merge_method: ties\nmodels: [{model: org/a, parameters: {weight: 1, density: 0.5}}]\n",
        refusal="needs a `base_model`",
    ),
    S(
        "dare-ties-llama3",
        """
models:
  - model: org/llama-3-8b
  - model: org/llama-3-8b-instruct
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: org/llama-3-8b-code
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: dare_ties
base_model: org/llama-3-8b
parameters:
  int8_mask: true
dtype: bfloat16
tokenizer_source: base
""",
    ),
    S(
        "dare-linear-lambda",
        """
merge_method: dare_linear
base_model: org/base
models:
  - model: org/ft-1
    parameters: {weight: 0.6, density: 0.4}
  - model: org/ft-2
    parameters: {weight: 0.4, density: 0.6}
parameters: {lambda: 1.1, rescale: true}
""",
    ),
    S(
        "task-arithmetic-negative",
        """
merge_method: task_arithmetic
base_model: org/base
models:
  - model: org/helpful
    parameters: {weight: 1.0}
  - model: org/toxic
    parameters: {weight: -0.5}
parameters: {normalize: false}
out_dtype: bfloat16
""",
    ),
    S(
        "breadcrumbs-ties-gamma",
        """
merge_method: breadcrumbs_ties
base_model: org/base
models:
  - model: org/ft-1
    parameters: {weight: 0.5, density: 0.9, gamma: 0.01}
  - model: org/ft-2
    parameters: {weight: 0.5, density: 0.9, gamma: 0.01}
""",
    ),
    S(
        "della-epsilon",
        """
merge_method: della
base_model: org/base
models:
  - model: org/ft-1
    parameters: {weight: 0.5, density: 0.7, epsilon: 0.15}
  - model: org/ft-2
    parameters: {weight: 0.5, density: 0.7, epsilon: 0.15}
parameters: {lambda: 1.0, normalize: true}
dtype: bfloat16
""",
    ),
    S(
        "model-stock",
        """
merge_method: model_stock
base_model: org/llama-3.1-8b
models:
  - model: org/ft-a
  - model: org/ft-b
  - model: org/ft-c
parameters: {filter_wise: false}
dtype: bfloat16
""",
    ),
    S(
        "sce-topk",
        """
merge_method: sce
base_model: org/qwen2.5-14b
models:
  - model: org/ft-a
  - model: org/ft-b
parameters: {select_topk: 0.1}
tokenizer_source: union
chat_template: chatml
""",
    ),
    S(
        "nuslerp-weights",
        """
merge_method: nuslerp
models:
  - model: org/a
    parameters: {weight: 0.7}
  - model: org/b
    parameters: {weight: 0.3}
parameters: {nuslerp_flatten: false}
""",
    ),
    S(
        "multislerp",
        """
merge_method: multislerp
models:
  - model: org/a
    parameters: {weight: 1.0}
  - model: org/b
    parameters: {weight: 1.0}
  - model: org/c
    parameters: {weight: 0.5}
""",
    ),
    S(
        "karcher",
        "merge_method: karcher\nmodels: [{model: org/a}, {model: org/b}, {model: org/c}]\n"
        "parameters: {max_iter: 20, tol: 1.0e-5}\n",
    ),
    S(
        "arcee-fusion",
        "merge_method: arcee_fusion\nbase_model: org/a\nmodels: [{model: org/a}, {model: org/b}]\n"
        "dtype: bfloat16\n",
    ),
    S(
        "nearswap",
        "merge_method: nearswap\nbase_model: org/a\nmodels: [{model: org/a}, {model: org/b}]\n"
        "parameters: {t: 0.0001}\n",
    ),
    S(
        "passthrough-professor-interleave",
        """
merge_method: linear
parameters:
  weight: 1.0
slices:
  - sources:
      - model: org/dolphin-70b
        layer_range: [0, 1]
      - model: org/dolphin-70b+org/math-lora
        layer_range: [0, 1]
        parameters:
          weight: 0
  - sources:
      - model: org/dolphin-70b
        layer_range: [1, 20]
  - sources:
      - model: org/wizard-math-70b
        layer_range: [10, 30]
  - sources:
      - model: org/dolphin-70b
        layer_range: [20, 79]
  - sources:
      - model: org/dolphin-70b
        layer_range: [79, 80]
      - model: org/dolphin-70b+org/math-lora
        layer_range: [79, 80]
        parameters:
          weight: 0
dtype: float16
tokenizer_source: model:org/dolphin-70b
""",
        refusal="model:",
        difference="model-prefix",
    ),
    S(
        "passthrough-self-stack-scale",
        """
dtype: float16
merge_method: passthrough
slices:
  - sources:
      - layer_range: [0, 16]
        model: org/dolphin-70b
  - sources:
      - layer_range: [8, 24]
        model: org/dolphin-70b
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: 0.0
            - value: 1.0
  - sources:
      - layer_range: [16, 80]
        model: org/dolphin-70b
""",
    ),
    S(
        "passthrough-bigllama-ranges",
        """
slices:
  - sources:
      - layer_range: [0, 105]
        model: org/biglama-405b
  - sources:
      - layer_range: [21, 126]
        model: org/biglama-405b
  - sources:
      - layer_range: [42, 126]
        model: org/biglama-405b
merge_method: passthrough
dtype: bfloat16
""",
    ),
    S(
        "passthrough-two-models-one-slice",
        """
merge_method: passthrough
slices:
  - sources:
      - {model: org/a, layer_range: [0, 8]}
      - {model: org/b, layer_range: [0, 8]}
""",
        refusal="passthrough takes at most 1 models",
    ),
    S(
        "passthrough-whole-models",
        "merge_method: passthrough\nmodels: [{model: org/a}, {model: org/b}]\n",
        refusal="use `slices`",
    ),
    S(
        "slices-per-slice-params-and-base",
        """
merge_method: ties
base_model: org/base
slices:
  - sources:
      - model: org/base
        layer_range: [0, 16]
      - model: org/ft
        layer_range: [0, 16]
        parameters: {weight: 0.8, density: 0.5}
    parameters: {normalize: false}
  - sources:
      - model: org/base
        layer_range: [16, 32]
      - model: org/ft
        layer_range: [16, 32]
    parameters: {weight: 0.3, density: 0.5}
    residual_weight: 0.1
""",
    ),
    S(
        "slices-unequal-lengths",
        """
merge_method: slerp
base_model: org/a
slices:
  - sources:
      - {model: org/a, layer_range: [0, 8]}
      - {model: org/b, layer_range: [0, 10]}
parameters: {t: 0.5}
""",
        refusal="span as many layers",
    ),
    S(
        "tokenizer-block-tokens",
        """
merge_method: linear
models:
  - model: org/chat
    parameters: {weight: 0.5}
  - model: org/base
    parameters: {weight: 0.5}
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    <|im_start|>:
      source: org/chat
    <|im_end|>:
      source:
        kind: model_token
        model: org/chat
        token: <|im_end|>
      force: true
    <|reserved|>:
      source: {kind: zero}
chat_template: auto
""",
    ),
    S(
        "tokenizer-source-model",
        """
merge_method: task_arithmetic
base_model: org/base
models:
  - model: org/instruct
    parameters: {weight: 1.0}
tokenizer_source: org/instruct
chat_template: "{% for m in messages %}{{ m['content'] }}{% endfor %}"
""",
    ),
    S(
        "tokenizer-source-and-block",
        """
merge_method: linear
models: [{model: org/a, parameters: {weight: 1}}]
tokenizer_source: union
tokenizer: {source: base}
""",
        refusal="not both",
    ),
    S(
        "mergekit-multi-named-document",
        """
name: first-step
merge_method: slerp
base_model: org/a
models: [{model: org/a}, {model: org/b}]
parameters: {t: 0.3}
""",
        notes=("field 'name' has no effect: mergekit-multi",),
    ),
    S(
        "mergekit-multi-two-documents",
        """
name: step-1
merge_method: linear
models: [{model: org/a, parameters: {weight: 1}}, {model: org/b, parameters: {weight: 1}}]
---
name: final
merge_method: slerp
base_model: org/a
models: [{model: org/a}, {model: step-1}]
parameters: {t: 0.5}
""",
        refusal="YAML",
    ),
    S(
        "target-model-key",
        """
merge_method: linear
target_model: ./merged-model
models: [{model: org/a, parameters: {weight: 1}}, {model: org/b, parameters: {weight: 1}}]
""",
        notes=("field 'target_model' has no effect: it is not a recipe key; the output path is",),
    ),
    S(
        "base-model-in-parameters",
        """
merge_method: dare_ties
models:
  - model: org/ft
    parameters: {weight: 1, density: 0.5}
parameters:
  base_model: org/base
""",
        refusal="needs a `base_model`",
    ),
    S(
        "base-model-in-parameters-too",
        """
merge_method: dare_ties
base_model: org/base
models:
  - model: org/ft
    parameters: {weight: 1, density: 0.5}
parameters:
  base_model: org/base
""",
        notes=("parameter 'base_model' has no effect",),
    ),
    S(
        "random-seed-and-revision",
        """
merge_method: dare_linear
base_model: org/base@main
models:
  - model: org/ft@0123456789abcdef0123456789abcdef01234567
    parameters: {weight: 1, density: 0.3}
random_seed: 7
""",
    ),
    S(
        "wildcard-filter",
        """
merge_method: slerp
base_model: org/a
models: [{model: org/a}, {model: org/b}]
parameters:
  t:
    - filter: "*"
      value: 0.25
""",
    ),
    S(
        "dtype-alias",
        "merge_method: linear\nmodels: [{model: org/a, parameters: {weight: 1}}]\ndtype: fp16\n",
        difference="dtype-alias",
    ),
    S(
        "dtype-unknown",
        "merge_method: linear\nmodels: [{model: org/a, parameters: {weight: 1}}]\ndtype: fp8\n",
        refusal="unknown dtype",
    ),
    S(
        "unknown-method",
        "merge_method: frankenmerge\nmodels: [{model: org/a}]\n",
        refusal="unknown merge method",
    ),
    S(
        "models-and-slices",
        """
merge_method: passthrough
models: [{model: org/a}]
slices:
  - sources: [{model: org/a, layer_range: [0, 2]}]
""",
        refusal="exactly one of",
    ),
    S(
        "modules-vlm-12b",
        """
merge_method: slerp
base_model: org/gemma-3-12b-it
modules:
  text_decoder:
    slices:
      - sources:
          - model: org/gemma-3-12b-it
            layer_range: [0, 48]
          - model: org/gemma-3-12b-roleplay
            layer_range: [0, 48]
    parameters:
      t:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - value: 0.5
  vision_tower:
    models:
      - model: org/gemma-3-12b-it
      - model: org/gemma-3-12b-roleplay
    parameters:
      t: 0
  multi_modal_projector:
    models:
      - model: org/gemma-3-12b-it
      - model: org/gemma-3-12b-roleplay
parameters:
  t: 0
dtype: bfloat16
""",
    ),
    S(
        "modules-ties-text-only-weights",
        """
merge_method: ties
base_model: org/mistral-small-3.1
modules:
  text_decoder:
    models:
      - model: org/mistral-small-3.1
      - model: org/ft-text
        parameters: {weight: 1, density: 0.6}
  vision_tower:
    models:
      - model: org/mistral-small-3.1
      - model: org/ft-text
        parameters: {weight: 0, density: 1}
  multi_modal_projector:
    models:
      - model: org/mistral-small-3.1
      - model: org/ft-text
        parameters: {weight: 0, density: 1}
""",
    ),
    S(
        "modules-missing-weight",
        """
merge_method: linear
modules:
  text_decoder:
    models: [{model: org/a, parameters: {weight: 1}}, {model: org/b}]
""",
        refusal="needs `weight` for model 'org/b'",
    ),
    S(
        "modules-models-and-slices",
        """
merge_method: passthrough
modules:
  text_decoder:
    models: [{model: org/a}]
    slices:
      - sources: [{model: org/a, layer_range: [0, 2]}]
""",
        refusal="exactly one of `models` or `slices` for this module",
    ),
    S(
        "modules-unknown-name",
        """
merge_method: linear
parameters: {weight: 1}
modules:
  language_model:
    models: [{model: org/a}, {model: org/b}]
""",
        refusal="unknown module 'language_model'",
        difference="module-name",
    ),
    S(
        "ties-per-model-normalize",
        """
merge_method: ties
base_model: org/base
models:
  - model: org/ft-1
    parameters: {weight: 0.5, density: 0.5, normalize: true}
  - model: org/ft-2
    parameters: {weight: 0.5, density: 0.5, normalize: 2}
""",
        notes=("parameter 'normalize' is set once for all models; a per-model value has no effect",),
    ),
    S(
        "slerp-models-base-not-listed",
        """
merge_method: slerp
base_model: org/a
models: [{model: org/b}, {model: org/c}]
parameters: {t: 0.5}
""",
        refusal="the base_model 'org/a' is not among the models ('org/b', 'org/c')",
    ),
    S(
        "modules-with-base-model-per-module",
        """
merge_method: linear
modules:
  text_decoder:
    base_model: org/a
    models:
      - {model: org/a, parameters: {weight: 0.5}}
      - {model: org/b, parameters: {weight: 0.5}}
  vision_tower:
    models: [{model: org/a, parameters: {weight: 1}}]
""",
        notes=(
            "modules.text_decoder.base_model (line 5): field 'base_model' has no effect here: the base is",
        ),
    ),
    S(
        "modules-slerp-base-outside",
        """
merge_method: slerp
base_model: org/a
modules:
  text_decoder:
    slices:
      - sources:
          - {model: org/b, layer_range: [0, 4]}
          - {model: org/c, layer_range: [0, 4]}
parameters: {t: 0.5}
""",
        refusal="the base_model 'org/a' is not among its sources",
    ),
)


def mergekit_refusal(text: str) -> str | None:
    """Why mergekit 0.1.5 refuses the recipe before reading a tensor, or None if it accepts it."""
    from mergekit import merge_methods
    from mergekit.common import dtype_from_name
    from mergekit.config import ConfigReader, InputSliceDefinition, MergeConfiguration, OutputSliceDefinition
    from mergekit.parameter_resolver import resolve_parameters

    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        method = merge_methods.get(config.merge_method)
        for name in (config.dtype, config.out_dtype):
            dtype_from_name(name)
        modules = config.modules or {"default": config}
        for module in modules.values():
            slices = module.slices or []
            if module.models:  # mergekit's planner turns them into one slice, with the base added
                sources = [
                    InputSliceDefinition(model=m.model, layer_range=(0, 1), parameters=m.parameters)
                    for m in module.models
                ]
                if config.base_model and config.base_model not in {m.model for m in module.models}:
                    sources.append(InputSliceDefinition(model=config.base_model, layer_range=(0, 1)))
                slices = [OutputSliceDefinition(sources=sources)]
            for out_slice in slices:
                base = out_slice.base_model or config.base_model
                ids = [s.model for s in out_slice.sources]
                if len({s.layer_range[1] - s.layer_range[0] for s in out_slice.sources}) > 1:
                    raise RuntimeError("All inputs to a slice must contain the same number of layers")
                method.validate_inputs(ids, base)
                reader = ConfigReader(
                    config=config, t=0, module=module if config.modules else None
                ).for_out_slice(out_slice)
                for tensor in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
                    resolve_parameters(
                        method.spec,
                        tensor_name=tensor,
                        inputs={m: tensor for m in ids},
                        sources=reader.parameter_sources,
                        base_model=base,
                        t=0,
                    )
    except Exception as exc:  # any failure is a refusal; the text is for the assertion's message
        return f"{type(exc).__name__}: {exc}"
    return None


def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 40
    assert len({s.id for s in CORPUS}) == len(CORPUS)
    assert all(s.difference in (None, *DIFFERENCES) for s in CORPUS)
    assert {s.difference for s in CORPUS} >= set(DIFFERENCES)


@pytest.mark.parametrize("shape", CORPUS, ids=lambda s: s.id)
def test_mergebot_accepts_what_mergekit_accepts(shape: Shape) -> None:
    oracle = mergekit_refusal(shape.text)
    try:
        config = load_recipe(shape.text)
        ours: str | None = None
    except RecipeError as exc:
        ours = str(exc)
        config = None
    if shape.difference is None:
        assert (ours is None) == (oracle is None), f"mergebot: {ours}\nmergekit: {oracle}"
    else:  # the documented difference still holds: the tools disagree
        assert (ours is None) != (oracle is None), f"mergebot: {ours}\nmergekit: {oracle}"
    if shape.refusal is not None:
        assert ours is not None and shape.refusal in ours, ours
    else:
        assert config is not None, ours
        for wanted in shape.notes:
            assert any(wanted in note for note in config.notes), (wanted, config.notes)
        if not shape.notes:
            assert config.notes == ()


# Recipes whose keys or parameters mergekit ignores, run on a tiny family ({0}: the base,
# {1}, {2}: fine-tunes). A tool that read `nomalize: false` as `normalize: false` would sum
# the weights of 1 instead of averaging; one that read `embed_slerp` would treat embeddings apart.
IGNORED_AT_RUN_TIME = {
    "nomalize": """
merge_method: linear
models:
  - {{model: {1}, parameters: {{weight: 1.0}}}}
  - {{model: {2}, parameters: {{weight: 1.0}}}}
parameters: {{nomalize: false}}
target_model: ./out
""",
    "embed-slerp": """
name: step-1
merge_method: slerp
base_model: {0}
models: [{{model: {0}}}, {{model: {1}}}]
parameters: {{t: 0.3, embed_slerp: false}}
""",
}


@pytest.mark.parametrize("recipe", IGNORED_AT_RUN_TIME, ids=str)
def test_what_mergekit_ignores_changes_nothing(recipe: str, llama_family: Family, tmp_path: Path) -> None:
    text = IGNORED_AT_RUN_TIME[recipe].format(*llama_family.models)
    config = load_recipe(text)
    assert config.notes
    theirs = load_tensors(run_mergekit(text, tmp_path / "mergekit"))
    run_merge(config, tmp_path / "mergebot", options=MergeOptions(seed=42))
    ours = load_tensors(tmp_path / "mergebot")
    assert sorted(ours) == sorted(theirs)
    for name, want in theirs.items():
        torch.testing.assert_close(ours[name].float(), want.float(), rtol=1e-2, atol=1e-5, msg=name)
