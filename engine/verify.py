"""Verify a merge's output before it is called done: the plan's promise, the files, and transformers.

Three checks, cheapest first:

- :func:`check_plan`: before any tensor is read, the plan covers its inputs (every tensor of
  the models is in the output, except layers a ``slices:`` recipe leaves out), and each layer
  stack of the output agrees with the output config (layer count, per-layer lists, indices);
- :func:`check_written`: after writing, the folder's index and config.json are the plan's;
- :func:`check_loads` (``--verify``, and always in the bot): transformers builds the model from
  the written config.json on the meta device (no memory, no weights read) and its state dict
  keys equal the written tensor names, after transformers' own checkpoint renamings, allowing
  tied weights; shapes agree too.

Each raises :class:`engine.errors.VerificationError` with every problem found.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from engine.architecture import LayerStack, find_stacks, layer_lists, parse_layer_name
from engine.config import MergeConfig
from engine.errors import VerificationError
from engine.plan import MergePlan, ModelMeta
from engine.writer import INDEX_NAME

log = logging.getLogger(__name__)

_SHOWN = 3  # names listed per problem


def _listing(names: Sequence[str]) -> str:
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(f"'{n}'" for n in names[:_SHOWN]) + more


def check_plan(config: MergeConfig, plan: MergePlan, models: Mapping[str, ModelMeta]) -> None:
    """Check that ``plan`` keeps every tensor the recipe does not drop and agrees with its config.

    Raises:
        VerificationError: with every problem found.
    """
    problems: list[str] = []
    out_names = [task.name for task in plan.tasks]
    written = set(out_names)
    used = {(item.model, item.tensor) for task in plan.tasks for item in task.inputs}
    donor = models[plan.donor]
    stack = donor.stack
    lost = [
        name
        for name in donor.tensors
        if name not in written and not (config.slices and stack is not None and stack.layer_of(name))
    ]
    if lost:
        problems.append(
            f"{len(lost)} tensors of '{plan.donor}' are missing from the output: {_listing(lost)}"
        )
    for out_slice in config.slices or []:
        for src in out_slice.sources:
            src_stack = models[src.model].stack
            low, high = src.layer_range
            unread = [
                name
                for name in models[src.model].tensors
                if src_stack is not None
                and (layer := src_stack.layer_of(name)) is not None
                and low <= layer.index < high
                and (src.model, name) not in used
            ]
            if unread:
                problems.append(
                    f"{len(unread)} tensors of layers [{low}, {high}) of '{src.model}' are not merged: "
                    f"{_listing(unread)}"
                )
    problems += stack_problems(plan.output_config, out_names, donor)
    if problems:
        raise VerificationError(problems)


def stack_problems(config: Mapping[str, Any], names: Sequence[str], donor: ModelMeta) -> list[str]:
    """Where an output's layer stacks disagree with its config (counts, per-layer lists, indices).

    Args:
        config: the output's config.json.
        names: the output's tensor names.
        donor: the model the output's config came from: its lists say which are per layer.
    """
    problems = []
    donor_stacks = {s.prefix: s for s in donor.stacks}
    donor_layers = {(p.prefix, p.index) for n in donor.tensors if (p := parse_layer_name(n))}
    for stack in find_stacks(config, names):
        indices = {p.index for n in names if (p := parse_layer_name(n)) and p.prefix == stack.prefix}
        absent = sorted(set(range(stack.count)) - indices)
        extra = sorted(i for i in indices if i >= stack.count and (stack.prefix, i) not in donor_layers)
        where = _where(stack)
        if absent:
            problems.append(
                f"{where} says {stack.count} layers, but layers {absent} of '{stack.prefix}' are missing"
            )
        if extra:
            problems.append(f"{where} says {stack.count} layers, but '{stack.prefix}' has layers {extra}")
        before = donor_stacks.get(stack.prefix)
        if before is None:
            continue
        settings = stack.settings(config)
        for key, kind in layer_lists(before.settings(donor.config), before.count).items():
            value = settings.get(key)
            if not isinstance(value, list):
                continue
            if kind == "per_layer" and len(value) != stack.count:
                problems.append(f"{_where(stack, key)} has {len(value)} entries for {stack.count} layers")
            if kind == "indices" and any(not isinstance(v, int) or not 0 <= v < stack.count for v in value):
                problems.append(f"{_where(stack, key)} names layers outside 0..{stack.count - 1}: {value}")
    return problems


def _where(stack: LayerStack, key: str | None = None) -> str:
    path = [p for p in (stack.section, key or stack.count_key) if p]
    return f"config.json's `{'.'.join(path)}`" if path else "config.json"


def written_names(folder: str | os.PathLike[str]) -> list[str]:
    """The tensor names of a written output, from its index (the shards may be gone, uploaded)."""
    with open(os.path.join(folder, INDEX_NAME), encoding="utf-8") as f:
        return list(json.load(f)["weight_map"])


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config: dict[str, Any] = json.load(f)
    return config


def check_written(plan: MergePlan, folder: str | os.PathLike[str]) -> None:
    """Check that the folder's index and config.json are what the plan promised.

    Raises:
        VerificationError: the index lists other tensors, or config.json differs.
    """
    problems = []
    names, planned = set(written_names(folder)), {task.name for task in plan.tasks}
    if names != planned:
        problems.append(
            f"the index lists {len(names)} tensors, the plan {len(planned)}: "
            f"missing {_listing(sorted(planned - names))}, unexpected {_listing(sorted(names - planned))}"
        )
    if read_config(folder) != json.loads(json.dumps(dict(plan.output_config))):
        problems.append("config.json is not the planned config")
    if problems:
        raise VerificationError(problems)


def check_loads(folder: str | os.PathLike[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> bool:
    """Check that transformers builds the written config and expects exactly the written tensors.

    The model is built on the meta device from config.json alone; no weights are read, and no
    code from a model repo is run. Written names are mapped through transformers' checkpoint
    renamings (legacy names such as ``language_model.model.layers``) before comparing.

    Args:
        folder: the output folder (config.json and the safetensors index are enough).
        shapes: the written tensors' shapes, by name, to compare as well.

    Returns:
        True when checked; False when transformers does not know the architecture (custom
        code, which mergebot never runs), so there is nothing to check against.

    Raises:
        VerificationError: transformers rejects the config, or tensors are missing or unexpected.
    """
    import torch
    import transformers

    config_data = read_config(folder)
    names = written_names(folder)
    known = config_data.get("model_type") in transformers.CONFIG_MAPPING
    if not known:
        log.info(
            "transformers does not know the model type %r; loading was not checked",
            config_data.get("model_type"),
        )
        return False
    try:
        config = transformers.AutoConfig.from_pretrained(os.fspath(folder), trust_remote_code=False)
    except (
        Exception
    ) as exc:  # transformers rejects a config with ValueError or its dataclass validation errors
        raise VerificationError([f"transformers cannot read config.json: {_first_line(exc)}"]) from None
    model_class = _model_class(transformers, config)
    if model_class is None:
        log.info(
            "transformers has no model class for %s; its loading was not checked",
            config_data.get("model_type"),
        )
        return False
    try:
        with torch.device("meta"):
            model = model_class(config)
    except Exception as exc:  # transformers' own errors for a config it cannot build: the output is broken
        raise VerificationError(
            [f"transformers cannot build the model from config.json: {_first_line(exc)}"]
        ) from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    loaded = _renamed(model, names, expected)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    ignore_unexpected = [
        re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
    ]
    missing = sorted(
        k
        for k in expected
        if k not in loaded.values() and k not in tied and not any(p.search(k) for p in ignore_missing)
    )
    unexpected = sorted(
        n for n, k in loaded.items() if k not in expected and not any(p.search(n) for p in ignore_unexpected)
    )
    problems = []
    if missing:
        problems.append(f"transformers expects {len(missing)} tensors the output lacks: {_listing(missing)}")
    if unexpected:
        problems.append(
            f"the output has {len(unexpected)} tensors transformers does not expect: {_listing(unexpected)}"
        )
    if shapes:
        wrong = sorted(
            n
            for n, k in loaded.items()
            if n == k and k in expected and n in shapes and tuple(shapes[n]) != expected[k]
        )
        if wrong:
            problems.append(
                f"{len(wrong)} tensors have other shapes than transformers expects: {_listing(wrong)}"
            )
    if problems:
        raise VerificationError(problems)
    return True


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {' '.join(lines)[:300]}" if lines else type(exc).__name__


def _model_class(transformers: Any, config: Any) -> Any:
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type):
            return cls
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForSeq2SeqLM", "AutoModel"):
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    return None


def _renamed(model: Any, names: Sequence[str], expected: dict[str, Any]) -> dict[str, str]:
    """Each written name -> the state dict key transformers would load it into."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads names as they are
        return {name: name for name in names}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)
    out = {}
    for name in names:
        renamed, _ = rename_source_key(name, renamings, converters, prefix, expected)
        if renamed not in expected and name in expected:
            renamed = name
        out[name] = renamed
    return out
