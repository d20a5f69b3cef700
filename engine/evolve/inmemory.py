"""Merging in memory: every input tensor read once, each trial's merge written into one resident model.

Why the inputs stay resident as they are stored (bf16 for a bf16 checkpoint) rather than as
precomputed task vectors: a trial must give exactly the tensors ``run_merge`` writes for the
recipe it reports. The resident models are served through the engine's own
:func:`engine.run.input_mode` and :func:`engine.run.merge_task` (the method functions, the plan's
resolved parameters and its per-tensor DARE seeds, the same fused kernels or slices), so the
arithmetic is the same code on the same float32 values and the result is byte-equal. A bf16 model costs 2 bytes a parameter either
way; a task vector ``model - base`` kept in bf16 would round, and in float32 would cost twice as
much. The methods subtract the base themselves, one tensor at a time: per trial, that is one
subtraction per element next to a forward pass over the evaluation data.

Memory: ``(n_models + 1) * parameters * stored bytes`` for the inputs, plus the resident
transformers model in the output dtype, plus one tensor's working set while merging.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from engine.config import MergeConfig
from engine.errors import IncompatibleModelsError
from engine.plan import MergePlan, ModelMeta, TensorTask, build_plan
from engine.run import InputMode, input_mode, merge_task, read_inputs
from engine.sources import ModelSource, TensorInfo, open_model
from engine.sources.safetensors_file import DTYPES

log = logging.getLogger(__name__)


class ResidentModel:
    """A model whose tensors were read once and are served from memory (a ``ModelSource``)."""

    def __init__(self, source: ModelSource) -> None:
        self.reference = source.reference
        self._config = source.config()
        self._infos = source.tensors()
        self._tensors = {name: source.read(name) for name in self._infos}  # stored dtype
        self._files = source.files()
        self._file_bytes = {name: source.read_file(name) for name in self._files}

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        # a fresh tensor, as from a file: a method may work in place on its inputs
        stored = self._tensors[name]
        return stored.to(dtype or stored.dtype, copy=True)

    @contextmanager
    def view(self, name: str) -> Iterator[torch.Tensor]:
        """The stored tensor itself, for merging by slices (callers copy what they take)."""
        yield self._tensors[name]

    def files(self) -> list[str]:
        return list(self._files)

    def read_file(self, relative_path: str) -> bytes:
        return self._file_bytes[relative_path]

    def close(self) -> None:
        self._tensors.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


class InMemoryMerger:
    """The models of a search, resident, merged by the engine's plan for any recipe over them."""

    def __init__(self, references: Iterable[str], *, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self.sources: dict[str, ResidentModel] = {}
        for ref in dict.fromkeys(references):
            opened = open_model(ref)
            try:
                self.sources[ref] = ResidentModel(opened)
            finally:
                opened.close()
        self.metadata = {
            ref: ModelMeta(ref, src.config(), src.tensors()) for ref, src in self.sources.items()
        }

    def plan(self, config: MergeConfig) -> MergePlan:
        """The engine's plan for ``config`` (the recipe's ``random_seed`` seeds DARE, as in run_merge)."""
        return build_plan(config, self.metadata)

    def merge(self, config: MergeConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """Each output tensor of ``config``'s merge, in plan order, in its output dtype."""
        plan = self.plan(config)
        tasks = plan.tasks
        if not tasks:
            return

        # As in run_merge: a reader thread converts the next tensor's inputs while this one merges,
        # and each tensor's inputs reach the method as run_merge's would (same path, same numbers).
        def fetch(task: TensorTask) -> tuple[InputMode, list[torch.Tensor] | None]:
            mode = input_mode(plan, task, self.sources, self.device)
            return mode, read_inputs(task, self.sources, self.device) if mode == "read" else None

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebot-evolve-read") as reader:
            pending = reader.submit(fetch, tasks[0])
            for index, task in enumerate(tasks):
                mode, inputs = pending.result()
                if index + 1 < len(tasks):
                    pending = reader.submit(fetch, tasks[index + 1])
                yield task.name, merge_task(plan, task, self.sources, mode, inputs)
                del inputs

    def output_dtype(self, config: MergeConfig) -> torch.dtype:
        """The dtype most float output tensors of ``config`` have: the resident model's dtype."""
        counts = Counter(DTYPES[t.dtype][0] for t in self.plan(config).tasks)
        floats = [(n, d) for d, n in counts.items() if d.is_floating_point]
        return max(floats, key=lambda item: item[0])[1] if floats else torch.float32

    @property
    def nbytes(self) -> int:
        return sum(src.nbytes for src in self.sources.values())


class ResidentCausalLM:
    """One transformers model, loaded once from the base folder; trials overwrite its weights."""

    def __init__(self, folder: str, *, dtype: torch.dtype, device: torch.device | None = None) -> None:
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
        self.model: Any = model.to(device or torch.device("cpu"))
        self.model.eval()
        self.model.requires_grad_(False)
        self._targets: dict[str, torch.Tensor] = dict(self.model.named_parameters())
        self._targets.update(dict(self.model.named_buffers()))
        self._aliases = {
            name: t for name, t in self.model.state_dict(keep_vars=True).items() if name not in self._targets
        }

    @torch.no_grad()
    def load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy a merge's tensors into the model's parameters (in place; nothing is written to disk).

        Raises:
            IncompatibleModelsError: a tensor has no place in the model, or a parameter got no tensor.
        """
        written: set[str] = set()
        for name, tensor in tensors:
            target = self._targets.get(name)
            if target is None:
                target = self._aliases.get(name)
            if target is None or tuple(target.shape) != tuple(tensor.shape):
                raise IncompatibleModelsError(
                    f"The merged tensor '{name}' {list(tensor.shape)} has no counterpart in the model loaded "
                    "from the base folder; evolve needs models of the base's architecture.",
                    field="tensor names",
                )
            target.copy_(tensor)
            written.add(name)
        missing = sorted(n for n, p in self.model.named_parameters() if n not in written)
        if missing:
            raise IncompatibleModelsError(
                f"The merge gave no value for {len(missing)} parameters of the model (first: '{missing[0]}').",
                field="tensor names",
            )

    def state(self) -> Mapping[str, torch.Tensor]:
        """The model's current tensors by checkpoint name (views, not copies)."""
        return {**self._aliases, **self._targets}
