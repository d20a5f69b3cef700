"""Recipe + model metadata -> the list of output tensors, each with its inputs and parameters.

No tensor data is read here: headers and config.json are enough. Gradients and filters are
resolved per tensor, so methods only ever see numbers. Layer positions follow mergekit,
because existing recipes depend on them:

- with ``models:``, every model contributes all its layers; layer ``i`` of ``n`` sits at
  ``t = i / (n - 1)`` on a gradient;
- with ``slices:``, ``t`` runs from 0 to 1 within each output slice (``t = 1`` for a
  one-layer slice), and output layers are numbered consecutively across slices;
- the tensors outside the blocks (embeddings, final norm, ``lm_head``) all take ``t = 0``,
  the *first* value of a gradient, and come from the first slice's models (embeddings) or
  the last slice's models (norm and head).

Layer numbers, gradients and slices refer to one layer stack (:mod:`engine.architecture`):
the language model's, in a checkpoint that also holds a vision tower or an encoder. Every
other stack is merged whole with the recipe's method, never sliced nor stacked: with
``models:`` each of its layers sits on the gradient along its own depth (mergekit does the
same per module); with ``slices:`` its tensors are outside the blocks (``t = 0``), and a
vision or audio tower and its projector come whole from the first slice's models, as the
embeddings do (an encoder-decoder's other stack, like its final norms, from the last slice's).

With ``tokenizer_source`` (or a ``tokenizer:`` block) the models' vocabularies, read
beforehand into :attr:`ModelMeta.vocabulary`, give the output vocabulary
(:mod:`engine.vocab`); tensors with a vocabulary axis may then differ in rows, and their
tasks are marked so the runner aligns their rows by token before merging.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from engine.architecture import (
    TIED_HEADS,
    LayerStack,
    default_stack,
    find_stacks,
    is_other_module,
    is_pre_weight,
    parse_layer_name,
    restack_config,
)
from engine.config import MergeConfig, Setting, ZeroEmbedding
from engine.errors import IncompatibleModelsError, RecipeError
from engine.methods import get_method
from engine.methods.base import MethodSpec, ParamValue, Scope
from engine.modules import TEXT_MODULE, module_config, module_config_key, module_of, module_tensors
from engine.sources.base import TensorInfo
from engine.sources.safetensors_file import DTYPES
from engine.vocab import (
    TokenRule,
    VocabPlan,
    Vocabulary,
    build_vocab_plan,
    has_vocabulary_axis,
    vocabulary_rows,
)

DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class ModelMeta:
    """What the planner knows about one model: its config.json and its tensor headers."""

    reference: str
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    vocabulary: Vocabulary | None = None  # read only when the recipe builds the output tokenizer

    @functools.cached_property
    def stacks(self) -> tuple[LayerStack, ...]:
        """Every layer stack of the model (language model, vision tower, encoder, ...)."""
        return find_stacks(self.config, self.tensors)

    @property
    def stack(self) -> LayerStack | None:
        """The stack a recipe's layer numbers refer to (the language model's)."""
        return default_stack(self.stacks)

    @property
    def num_layers(self) -> int:
        return self.stack.count if self.stack is not None else 0


@dataclass(frozen=True)
class TensorInput:
    model: str
    tensor: str


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs come from and the numbers its method needs."""

    name: str
    inputs: tuple[TensorInput, ...]
    base_index: int | None
    params: Mapping[str, ParamValue]
    input_params: tuple[Mapping[str, ParamValue], ...]
    seeds: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the output
    read_dtype: str | None  # recipe `dtype`: inputs are rounded to it before merging
    vocab_axis: int | None = None  # rows are tokens: align them to the plan's vocabulary first

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class MergePlan:
    method: MethodSpec
    tasks: tuple[TensorTask, ...]
    output_config: Mapping[str, Any]
    donor: str  # the model whose config, tokenizer and extra files the output takes
    bytes_to_read: int
    bytes_to_write: int
    notes: tuple[str, ...] = field(default=())
    vocab: VocabPlan | None = None  # the output vocabulary, when the recipe builds it


def tensor_seed(seed: int, tensor: str, input_index: int) -> int:
    """A 63-bit seed derived from the recipe seed, the output tensor and the input's position."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{input_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class _Source:
    """One model feeding an output group, with the parameters written for it."""

    model: str
    params: Mapping[str, Setting] | None
    first_layer: int


@dataclass(frozen=True)
class _Group:
    """A run of output layers merged from the same sources (a slice, or the whole model)."""

    sources: tuple[_Source, ...]
    num_layers: int
    base: str | None
    params: Mapping[str, Setting] | None


def build_plan(config: MergeConfig, models: Mapping[str, ModelMeta], *, seed: int | None = None) -> MergePlan:
    """Plan every output tensor of a merge.

    Raises:
        IncompatibleModelsError: tensor names, shapes or layer counts disagree.
        RecipeError: a parameter resolves to an invalid value for some tensor.
    """
    if config.modules:
        return _build_module_plan(config, models, seed=seed)
    method = get_method(config.merge_method)
    groups = _groups(config, models)
    donor = config.base_model or config.referenced_models()[0]
    base_seed = seed if seed is not None else (config.random_seed or 0)
    reference_model = models[donor]
    stack = reference_model.stack
    prefix = stack.prefix if stack is not None else None
    out_dtype_name = config.out_dtype or config.dtype
    out_dtype = DTYPE_CODES[out_dtype_name] if out_dtype_name else None
    vocab = _vocab_plan(config, models, donor)
    planner = _Planner(config, method, models, base_seed, out_dtype, vocab)

    # Names outside the blocks, in the donor's order: embeddings first, then the rest.
    outside = [n for n in reference_model.tensors if stack is None or stack.layer_of(n) is None]
    # the embeddings, and a vision or audio tower with its projector (whole, from one model), come first
    pre = [n for n in outside if is_pre_weight(n) or is_other_module(n)]
    post = [n for n in outside if not (is_pre_weight(n) or is_other_module(n))]
    first, last = groups[0], groups[-1]
    others = [s for s in reference_model.stacks if s != stack] if config.models else []
    for name in pre:
        planner.add(name, [(s, name) for s in first.sources], first, t=_depth(name, others))
    out_layer = 0
    for group in groups:
        for offset in range(group.num_layers):
            t = offset / (group.num_layers - 1) if group.num_layers > 1 else 1.0
            for rest in _layer_suffixes(models, group, offset, prefix):
                out_name = f"{prefix}.{out_layer}.{rest}"
                inputs = [(s, f"{prefix}.{s.first_layer + offset}.{rest}") for s in group.sources]
                planner.add(out_name, inputs, group, t=t)
            out_layer += 1
    for name in post:
        planner.add(name, [(s, name) for s in last.sources], last, t=_depth(name, others))
    for head in TIED_HEADS:
        if head not in reference_model.tensors and any(head in models[s.model].tensors for s in last.sources):
            planner.add(head, [(s, head) for s in last.sources], last, t=0.0)

    output_config = _output_config(config, models, donor, groups)
    if stack is not None and len(reference_model.stacks) > 1:
        planner.notes.append(stack_note(stack, reference_model.stacks))
    if vocab is not None:
        _set_vocab_size(output_config, vocab.size)
        planner.notes.extend(vocab_notes(vocab, donor))
    tasks = tuple(planner.tasks)
    return MergePlan(
        method=method,
        tasks=tasks,
        output_config=output_config,
        donor=donor,
        bytes_to_read=planner.bytes_to_read,
        bytes_to_write=sum(t.nbytes for t in tasks),
        notes=(*config.notes, *planner.notes),
        vocab=vocab,
    )


def _build_module_plan(
    config: MergeConfig, models: Mapping[str, ModelMeta], *, seed: int | None
) -> MergePlan:
    """Plan a ``modules:`` recipe: each module is planned as a recipe of its own, over its own tensors.

    A module's parameters sit between its slices' and the recipe's: a module's setting whose
    filter misses a tensor falls through to the recipe's, as in mergekit.

    Raises:
        RecipeError: the models have a module the recipe leaves out (mergekit would write a model
            without it), or the recipe names a module the models do not have.
        IncompatibleModelsError, RecipeError: as :func:`build_plan`, for any module.
    """
    donor = config.base_model or config.referenced_models()[0]
    donor_tensors = list(models[donor].tensors)
    listed = set(config.modules or {})
    left_out = {}
    for module in dict.fromkeys(module_of(name) for name in donor_tensors):
        if module not in listed:
            names = module_tensors(donor_tensors, module)
            left_out[module] = f"'{module}' ({len(names)} tensors, e.g. '{names[0]}')"
    if left_out:
        raise RecipeError.single(
            "modules",
            f"'{donor}' has modules that `modules` leaves out: {', '.join(left_out.values())}; the merged "
            f"model would lack them. Add {', '.join(f'`{m}:`' for m in left_out)} with the models to merge "
            "each from",
        )
    plans: list[MergePlan] = []
    output_config = _output_config(config, models, donor, [])
    for part in config.parts():
        assert part.module is not None
        module = part.module
        top = config.parameters or {}
        own = part.parameters or {}
        parameters = {
            name: Setting((*own[name].branches, *top[name].branches))
            if name in own and name in top
            else own.get(name) or top[name]
            for name in {**top, **own}
        }
        update: dict[str, Any] = {
            "modules": None,
            "models": part.models,
            "slices": part.slices,
            "parameters": parameters,
        }
        if module != TEXT_MODULE:  # the vocabulary is the text decoder's (embeddings, output head)
            update.update(tokenizer_source=None, tokenizer=None)
        sub = config.model_copy(update=update)
        sub_models = {
            ref: ModelMeta(
                ref,
                module_config(models[ref].config, module),
                {n: models[ref].tensors[n] for n in module_tensors(models[ref].tensors, module)},
                models[ref].vocabulary,
            )
            for ref in sub.referenced_models()
        }
        empty = next((ref for ref, meta in sub_models.items() if not meta.tensors), None)
        if empty is not None:
            raise RecipeError.single(f"modules.{module}", f"'{empty}' has no tensors of module '{module}'")
        plan = build_plan(sub, sub_models, seed=seed)
        plans.append(plan)
        _merge_module_config(output_config, module, sub_models[donor].config, plan.output_config)
    tasks = tuple(task for plan in plans for task in plan.tasks)
    vocab = next((plan.vocab for plan in plans if plan.vocab is not None), None)
    return MergePlan(
        method=plans[0].method,
        tasks=tasks,
        output_config=output_config,
        donor=donor,
        bytes_to_read=sum(plan.bytes_to_read for plan in plans),
        bytes_to_write=sum(t.nbytes for t in tasks),
        notes=tuple(dict.fromkeys(note for plan in plans for note in plan.notes)),
        vocab=vocab,
    )


def _merge_module_config(
    out: dict[str, Any], module: str, before: Mapping[str, Any], after: Mapping[str, Any]
) -> None:
    """Write what planning one module changed in its part of config.json (layer count, vocabulary size)."""
    changed = {
        k: v for k, v in after.items() if k not in ("dtype", "torch_dtype") and before.get(k, object()) != v
    }
    if not changed:
        return
    key = module_config_key(out, module)
    if key is not None:
        out[key] = {**out[key], **changed}
    elif module == TEXT_MODULE:
        out.update(changed)


def _vocab_plan(config: MergeConfig, models: Mapping[str, ModelMeta], base: str) -> VocabPlan | None:
    source = config.vocabulary_source
    if source is None:
        return None
    refs = config.referenced_models()
    vocabularies: dict[str, Vocabulary] = {}
    limits: dict[str, int] = {}
    for ref in refs:
        vocabulary = models[ref].vocabulary
        if vocabulary is None:
            raise IncompatibleModelsError(
                f"The tokenizer of '{ref}' was not read, and `tokenizer_source` needs every model's "
                "(plan with engine.run.plan_merge, which reads them)",
                models=[ref],
                field="tokenizer",
            )
        vocabularies[ref] = vocabulary
        limits[ref] = vocabulary_rows(models[ref].config, vocabulary) or len(vocabulary.tokens)
    block = config.tokenizer
    rules: dict[str, TokenRule] = {}
    for token, embedding in ((block.tokens or {}) if block else {}).items():
        src = embedding.source
        if src is None:
            continue  # no rule: the default fill applies (mergekit has no meaning for it)
        if isinstance(src, str):
            rules[token] = TokenRule("model", model=src, force=embedding.force)
        elif isinstance(src, ZeroEmbedding):
            rules[token] = TokenRule("zero", force=embedding.force)
        else:
            row = src.token_id
            if row is None:
                row = vocabularies[src.model].tokens.get(src.token or "")
                if row is None:
                    raise RecipeError.single(
                        f"tokenizer.tokens.{token}.source.token", f"'{src.model}' has no token {src.token!r}"
                    )
            rules[token] = TokenRule("model_row", model=src.model, row=row, force=embedding.force)
    return build_vocab_plan(
        source,
        refs,
        base,
        vocabularies,
        limits,
        extra_tokens=rules,
        pad_to_multiple_of=block.pad_to_multiple_of if block else None,
    )


def stack_note(stack: LayerStack, stacks: Sequence[LayerStack]) -> str:
    """Which layers a recipe's layer numbers and gradients refer to, when a model has several stacks."""
    others = ", ".join(f"'{s.prefix}' ({s.role}, {s.count} layers)" for s in stacks if s != stack)
    return (
        f"layer numbers refer to '{stack.prefix}' ({stack.role}, {stack.count} layers); "
        f"merged whole, never stacked: {others}"
    )


def vocab_notes(vocab: VocabPlan, base: str, shown: int = 8) -> list[str]:
    """What the vocabulary merge did, in words: the report the CLI prints and the bot posts."""

    def listing(tokens: Sequence[str]) -> str:
        more = f", ... ({len(tokens) - shown} more)" if len(tokens) > shown else ""
        return ", ".join(repr(t) for t in tokens[:shown]) + more

    source = {"base": f"the base's tokenizer ('{base}')", "union": "the union of the models' tokenizers"}.get(
        vocab.source, f"the tokenizer of '{vocab.source}'"
    )
    padded = f", padded to {vocab.size} rows" if vocab.size > len(vocab.tokens) else ""
    notes = [f"output vocabulary: {source}, {len(vocab.tokens)} tokens{padded}"]
    if vocab.added:
        notes.append(f"tokens added to the base's vocabulary ({len(vocab.added)}): {listing(vocab.added)}")
    for model in vocab.rows:
        missing = vocab.missing(model)
        if missing:
            notes.append(
                f"'{model}' lacks {len(missing)} of these tokens ({listing(missing)}); its rows for them are "
                "filled as mergekit does: the base's row, else the mean of the models that have the token"
            )
    return notes


def _set_vocab_size(config: dict[str, Any], size: int) -> None:
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        config["text_config"] = {**text, "vocab_size": size}
    else:
        config["vocab_size"] = size


def _depth(name: str, stacks: Sequence[LayerStack]) -> float:
    """A tensor's place on a gradient: along its own stack's depth, or 0 outside every stack."""
    for stack in stacks:
        layer = stack.layer_of(name)
        if layer is not None:
            return layer.index / (stack.count - 1) if stack.count > 1 else 1.0
    return 0.0


def _groups(config: MergeConfig, models: Mapping[str, ModelMeta]) -> list[_Group]:
    if config.models:
        sources = [_Source(m.model, m.parameters, 0) for m in config.models]
        if config.base_model and config.base_model not in {s.model for s in sources}:
            sources.append(_Source(config.base_model, None, 0))
        counts = {s.model: models[s.model].num_layers for s in sources}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"'{m}': {n}" for m, n in counts.items())
            raise IncompatibleModelsError(
                f"The models have different numbers of layers ({detail}); merging whole models needs the same "
                "depth. Use `slices` with `layer_range` to choose layers.",
                models=list(counts),
                field="num_hidden_layers",
            )
        return [_Group(tuple(sources), next(iter(counts.values())), config.base_model, None)]
    groups = []
    for s_index, out_slice in enumerate(config.slices or []):
        base = out_slice.base_model or config.base_model
        sources = [_Source(src.model, src.parameters, src.layer_range[0]) for src in out_slice.sources]
        for j, src in enumerate(out_slice.sources):
            available = models[src.model].num_layers
            if src.layer_range[1] > available:
                raise RecipeError.single(
                    f"slices[{s_index}].sources[{j}].layer_range",
                    f"[{src.layer_range[0]}, {src.layer_range[1]}) goes past the last layer of '{src.model}', "
                    f"which has {available} layers (0 to {available - 1})",
                )
        length = out_slice.sources[0].layer_range[1] - out_slice.sources[0].layer_range[0]
        if base and base not in {s.model for s in sources} and get_method(config.merge_method).needs_base:
            sources.append(_Source(base, None, out_slice.sources[0].layer_range[0]))
        groups.append(_Group(tuple(sources), length, base, out_slice.parameters))
    return groups


def _layer_suffixes(
    models: Mapping[str, ModelMeta], group: _Group, offset: int, prefix: str | None
) -> list[str]:
    """The tensor names (after the layer index) of one layer, which every source must have."""
    per_source: list[tuple[str, list[str]]] = []
    for src in group.sources:
        index = src.first_layer + offset
        rests = [
            p.rest
            for n in models[src.model].tensors
            if (p := parse_layer_name(n)) and p.prefix == prefix and p.index == index
        ]
        per_source.append((src.model, rests))
    reference_model, reference = per_source[0]
    layer = group.sources[0].first_layer + offset
    for model, rests in per_source[1:]:
        for have, have_model, lack, lack_model in (
            (reference, reference_model, rests, model),
            (rests, model, reference, reference_model),
        ):
            missing = [r for r in have if r not in lack]
            if missing:
                raise IncompatibleModelsError(
                    f"Tensor '{prefix}.{layer}.{missing[0]}' of '{have_model}' has no counterpart in "
                    f"'{lack_model}' ({len(missing)} tensors of that layer are missing). "
                    "The models do not share an architecture.",
                    models=[have_model, lack_model],
                    field="tensor names",
                )
    return reference


class _Planner:
    def __init__(
        self,
        config: MergeConfig,
        method: MethodSpec,
        models: Mapping[str, ModelMeta],
        seed: int,
        out_dtype: str | None,
        vocab: VocabPlan | None,
    ) -> None:
        self.config = config
        self.vocab = vocab
        self.method = method
        self.models = models
        self.seed = seed
        self.out_dtype = out_dtype
        self.read_dtype = DTYPE_CODES[config.dtype] if config.dtype else None
        self.tasks: list[TensorTask] = []
        self.bytes_to_read = 0
        self.notes: list[str] = []

    def add(self, out_name: str, inputs: Sequence[tuple[_Source, str]], group: _Group, t: float) -> None:
        resolved: list[tuple[_Source, str]] = []
        for src, tensor in inputs:
            available = self.models[src.model].tensors
            if tensor not in available:
                tied = next((alt for alt in TIED_HEADS.get(tensor, ()) if alt in available), None)
                if tied is None:
                    raise IncompatibleModelsError(
                        f"Model '{src.model}' has no tensor '{tensor}', which the merge needs for '{out_name}'. "
                        "The models do not share an architecture.",
                        models=[src.model],
                        field="tensor names",
                    )
                tensor = tied  # output head tied to the input embedding in this model
            resolved.append((src, tensor))

        infos = [self.models[src.model].tensors[tensor] for src, tensor in resolved]
        vocab_axis = self._vocab_axis(out_name, resolved, infos)
        shape = (
            infos[0].shape
            if vocab_axis is None or self.vocab is None
            else (self.vocab.size, *infos[0].shape[1:])
        )
        shapes = {info.shape if vocab_axis is None else info.shape[1:] for info in infos}
        if len(shapes) > 1:
            detail = ", ".join(
                f"'{src.model}': {list(i.shape)}" for (src, _), i in zip(resolved, infos, strict=True)
            )
            hint = ""
            if has_vocabulary_axis(out_name) and self.vocab is None:
                hint = (
                    " The vocabularies differ in size: set `tokenizer_source` (base, union or a model) "
                    "to build the output vocabulary and align the rows by token."
                )
            raise IncompatibleModelsError(
                f"Tensor '{out_name}' has different shapes ({detail}).{hint}",
                models=[src.model for src, _ in resolved],
                field="shape",
            )

        base = group.base
        base_index = next((i for i, (src, _) in enumerate(resolved) if src.model == base), None)
        params = {
            p.name: self._resolve(p.name, group, None, out_name, t, p.scope)
            for p in self.method.params_in(Scope.SHARED)
        }
        input_params = []
        for i, (src, tensor) in enumerate(resolved):
            scopes = (Scope.INPUT,) if i == base_index else (Scope.INPUT, Scope.NON_BASE)
            input_params.append(
                MappingProxyType(
                    {
                        p.name: self._resolve(p.name, group, src, tensor, t, p.scope)
                        for p in self.method.params_in(*scopes)
                    }
                )
            )
        self._check_values(out_name, params, input_params, base_index)
        stored = infos[0].dtype
        self.bytes_to_read += sum(info.nbytes for info in infos)
        self.tasks.append(
            TensorTask(
                name=out_name,
                inputs=tuple(TensorInput(src.model, tensor) for src, tensor in resolved),
                base_index=base_index,
                params=MappingProxyType(params),
                input_params=tuple(input_params),
                seeds=tuple(tensor_seed(self.seed, out_name, i) for i in range(len(resolved))),
                shape=shape,
                dtype=self.out_dtype if self.out_dtype and _is_float(stored) else stored,
                read_dtype=self.read_dtype,
                vocab_axis=vocab_axis,
            )
        )

    def _vocab_axis(
        self, out_name: str, resolved: Sequence[tuple[_Source, str]], infos: Sequence[TensorInfo]
    ) -> int | None:
        """0 when the tensor's rows are the vocabulary of every input (embeddings, output heads)."""
        if self.vocab is None or not has_vocabulary_axis(out_name):
            return None
        for (src, _), info in zip(resolved, infos, strict=True):
            meta = self.models[src.model]
            if not info.shape or info.shape[0] != vocabulary_rows(meta.config, meta.vocabulary):
                return None
        return 0

    def _resolve(
        self, name: str, group: _Group, source: _Source | None, tensor: str, t: float, scope: Scope
    ) -> ParamValue:
        spec = self.method.param(name)
        assert spec is not None
        scopes: list[Mapping[str, Setting] | None] = []
        if source is not None:
            scopes.append(source.params)
        scopes += [group.params, self.config.parameters]
        for settings in scopes:
            if settings and name in settings:
                value = settings[name].resolve(tensor, t, spec)
                if value is not None:
                    return value
        if spec.default is None:
            who = f" for model '{source.model}'" if source else ""
            raise RecipeError.single(
                "parameters", f"`{name}` is not set{who} for tensor '{tensor}' (no filter matched it)"
            )
        return spec.default

    def _check_values(
        self,
        out_name: str,
        params: Mapping[str, ParamValue],
        input_params: Sequence[Mapping[str, ParamValue]],
        base_index: int | None,
    ) -> None:
        if self.method.name == "linear" and params.get("normalize"):
            total = sum(float(p["weight"]) for p in input_params)
            if abs(total) < 1e-12:
                raise RecipeError.single(
                    "parameters.weight",
                    f"the weights for tensor '{out_name}' sum to 0, so they cannot be normalized; "
                    "change them or set `normalize: false`",
                )
        if self.method.needs_base and base_index is None:
            raise RecipeError.single("base_model", f"{self.method.name} needs a base model among the inputs")


def _is_float(code: str) -> bool:
    return code in {"F64", "F32", "F16", "BF16"}


def _output_config(
    config: MergeConfig, models: Mapping[str, ModelMeta], donor: str, groups: Sequence[_Group]
) -> dict[str, Any]:
    """The donor's config.json, with the layer count (and per-layer lists) of the stacked model."""
    out = dict(models[donor].config)
    out_dtype = config.out_dtype or config.dtype
    if out_dtype:
        key = "torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"
        out[key] = out_dtype
    stack = models[donor].stack
    if config.slices and stack is not None:
        layers = [
            (models[group.sources[0].model].config, group.sources[0].first_layer + offset)
            for group in groups
            for offset in range(group.num_layers)
        ]
        out = restack_config(out, stack, layers)
    return out
