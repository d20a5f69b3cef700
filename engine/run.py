"""Stream a plan through the methods into the writer.

Memory bound: at any time the engine holds the inputs of two output tensors in the compute
dtype (the one being merged and the next, read ahead by a reader thread: 2 x n_inputs
tensors), the method's working set (for the task-vector methods n_inputs - 1 weighted
deltas and up to 5 temporaries of the same size), and up to three outputs (one being
computed, two waiting for the writer thread). Input pages are dropped from the process
after each read and output bytes go straight to their file. So peak resident memory is at
most about ``(3 * n_inputs + 8) * largest_tensor_elements * 4`` bytes above the
interpreter's, whatever the number of tensors in the model. Elementwise methods (linear,
task arithmetic, passthrough) need far less: they merge slice by slice from memory maps.
(The CLI also makes glibc return freed tensor memory at once; see ``engine.cli``.)

The output is built in a hidden temporary folder beside the destination and renamed into
place only when complete, so a failed merge leaves no partial output behind.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine import buffers, kernels
from engine.anatomy import Anatomy, write_report
from engine.config import MergeConfig
from engine.errors import MergeError, OutputError, RecipeError
from engine.methods.base import MergeCall
from engine.parallel import map_on_cores
from engine.plan import MergePlan, ModelMeta, TensorTask, build_plan
from engine.sources import ModelSource, open_model
from engine.sources.safetensors_file import DTYPES
from engine.verify import check_loads, check_plan, check_written
from engine.vocab import align_rows
from engine.writer import DEFAULT_SHARD_BYTES, OutputTensor, ShardedWriter

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
Observer = Callable[[Sequence[torch.Tensor]], None]  # sees one tensor's inputs before its merge

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
RECIPE_NAME = "mergekit_config.yml"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (the recipe says what to merge)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_shard_size: int = DEFAULT_SHARD_BYTES
    seed: int | None = None  # overrides the recipe's random_seed
    allow_pickle: bool = False
    copy_tokenizer: bool = True
    overwrite: bool = False
    base_dir: str | None = None  # where relative model paths in the recipe are looked up too
    hub_endpoint: str | None = None  # None: huggingface_hub's default (HF_ENDPOINT or huggingface.co)
    hub_token: str | None = field(default=None, repr=False)  # never shown in reprs or logs
    verify: bool = False  # also check that transformers loads the output (engine.verify.check_loads)
    report: bool = False  # also write merge_report.json and merge_anatomy.png (engine.anatomy)


@dataclass(frozen=True)
class MergeResult:
    out_path: str
    tensors: int
    bytes_written: int
    shards: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


class OpenModels:
    """Every model a recipe references, opened once and closed together."""

    def __init__(self, config: MergeConfig, options: MergeOptions) -> None:
        self.config = config
        self._metadata: dict[str, ModelMeta] | None = None
        self.sources: dict[str, ModelSource] = {}
        try:
            for ref in config.referenced_models():
                self.sources[ref] = open_model(
                    ref,
                    allow_pickle=options.allow_pickle,
                    base_dir=options.base_dir,
                    hub_endpoint=options.hub_endpoint,
                    hub_token=options.hub_token,
                )
        except BaseException:
            self.close()
            raise

    def metadata(self) -> dict[str, ModelMeta]:
        """Configs and tensor headers, and the tokenizers when the recipe builds the output's."""
        if self._metadata is None:
            read_vocab = self.config.vocabulary_source is not None
            if read_vocab:
                from engine.tokenizer import read_vocabulary
            self._metadata = {
                ref: ModelMeta(ref, src.config(), src.tensors(), read_vocabulary(src) if read_vocab else None)
                for ref, src in self.sources.items()
            }
        return dict(self._metadata)

    def close(self) -> None:
        for src in self.sources.values():
            src.close()

    def __enter__(self) -> OpenModels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plan_merge(config: MergeConfig, options: MergeOptions | None = None) -> MergePlan:
    """Plan a merge from headers and configs only (what ``--dry-run`` prints)."""
    options = options or MergeOptions()
    with OpenModels(config, options) as opened:
        return build_plan(config, opened.metadata(), seed=options.seed)


def _log_notes(plan: MergePlan) -> None:
    for note in plan.notes:
        log.info("%s", note)


def run_merge(
    config: MergeConfig,
    out_path: str | os.PathLike[str],
    *,
    options: MergeOptions | None = None,
    progress: Progress | None = None,
    on_shard: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge the recipe's models into ``out_path`` (created; must not hold another model).

    Args:
        progress: called with (done, total, tensor name) after each output tensor.
        on_shard: called with the path of each shard as soon as it is complete, before the
            merge ends (the bot uploads shards as they come), from the engine's writer thread.
            It may remove the file once it has used it, to keep the disk use of a large
            merge to about one shard.

    The plan and the written folder are verified (:mod:`engine.verify`) before the output is
    moved into place; with ``options.verify``, transformers must also load it.

    Raises:
        MergeError: a subclass naming what the user has to fix; nothing is left at ``out_path``.
        VerificationError: the output is not what the plan promised; nothing is left at ``out_path``.
    """
    options = options or MergeOptions()
    out = os.path.abspath(os.fspath(out_path))
    _check_destination(out, options.overwrite)
    device = resolve_device(options.device)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    except OSError as exc:
        raise OutputError(out, exc.strerror or str(exc)) from None
    try:
        with OpenModels(config, options) as opened:
            plan = build_plan(config, opened.metadata(), seed=options.seed)
            check_plan(config, plan, opened.metadata())
            _log_notes(plan)
            writer = ShardedWriter(
                staging,
                [OutputTensor(t.name, t.dtype, t.shape) for t in plan.tasks],
                options.out_shard_size,
                on_shard=on_shard,
            )
            anatomy = Anatomy(plan) if options.report else None
            try:
                _execute(plan, opened.sources, writer, device, progress, anatomy)
                writer.finish()
            finally:
                writer.abort()
                buffers.POOL.clear()  # a long-lived process (the bot) keeps nothing between merges
                if anatomy is not None:
                    anatomy.close()
            _write_side_files(config, plan, opened.sources, staging, options)
            if anatomy is not None:
                write_report(anatomy.report(), staging)
        check_written(plan, staging)
        if options.verify:
            check_loads(staging, {task.name: task.shape for task in plan.tasks})
        _publish(staging, out, options.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(
        out_path=out,
        tensors=len(plan.tasks),
        bytes_written=plan.bytes_to_write,
        shards=tuple(writer.shard_names),
        notes=plan.notes,
    )


def _execute(
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    writer: ShardedWriter,
    device: torch.device,
    progress: Progress | None,
    anatomy: Anatomy | None = None,
) -> None:
    """Compute tensors in plan order, with reading and writing overlapped.

    A reader thread fetches the next tensor's inputs while this one is merged, and a writer
    thread stores finished tensors (at most two wait for it, which bounds memory) while the
    next ones are computed. Errors from either thread surface here. ``anatomy`` observes each
    tensor's inputs once: in the reader thread when they are read, else the views the merge
    uses, just before it (so their pages are mapped once).
    """
    tasks = plan.tasks
    total = len(tasks)
    if not total:
        return

    def fetch(task: TensorTask) -> tuple[InputMode, list[torch.Tensor] | None]:
        mode = input_mode(plan, task, sources, device)
        inputs = read_inputs(task, sources, device) if mode == "read" else None
        if anatomy is not None and inputs is not None:
            anatomy.observe(task, inputs)  # views are observed where they are merged, below
        return mode, inputs

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebot-read") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergebot-write") as writing,
    ):
        pending = reader.submit(fetch, tasks[0])
        writes: deque[Future[None]] = deque()
        for done, task in enumerate(tasks):
            mode, inputs = pending.result()
            if done + 1 < total:
                pending = reader.submit(fetch, tasks[done + 1])
            observe = None if anatomy is None or mode == "read" else functools.partial(anatomy.observe, task)
            result = merge_task(plan, task, sources, mode, inputs, observe=observe)
            del inputs
            while len(writes) >= 2:
                writes.popleft().result()
            writes.append(writing.submit(writer.write, task.name, result))
            del result
            if progress:
                progress(done + 1, total, task.name)
        while writes:
            writes.popleft().result()


RELEASE_BYTES = 16 << 20  # tensors this large drop their inputs' pages as they are merged
SLICE_ELEMENTS = 1 << 18  # 1 MiB of float32 per input: stays in cache while it is merged
KERNEL_STORED = {"BF16", "F32"}

InputMode = Literal["read", "slices", "views"]


def input_mode(
    plan: MergePlan, task: TensorTask, sources: Mapping[str, ModelSource], device: torch.device
) -> InputMode:
    """How one tensor's inputs reach its method; every caller (run_merge, evolve) asks here.

    ``read``: whole, in the compute dtype (:func:`read_inputs`). ``views``: zero-copy views of
    the files as stored, for methods that stream (the task-vector family, and elementwise
    methods where the fused kernels run). ``slices``: elementwise methods in torch, slice by
    slice from the views (:func:`combine_by_slices`). Views only where the recipe's
    ``dtype`` would not round the inputs: a view cannot be rounded without a copy.
    """
    if not (
        device.type == "cpu"
        and task.vocab_axis is None
        and DTYPES[task.dtype][0].is_floating_point
        and all(hasattr(sources[item.model], "view") for item in task.inputs)
    ):
        return "read"
    method = plan.method
    if method.streams:
        stored = {sources[item.model].tensors()[item.tensor].dtype for item in task.inputs}
        unrounded = task.read_dtype in (None, "F32") or stored == {task.read_dtype}
        if method.elementwise:  # streamed only for the kernels; else slices do better in torch
            if (
                unrounded
                and kernels.available()
                and len(stored) == 1
                and stored <= KERNEL_STORED
                and DTYPES[task.dtype][0] in kernels.KERNEL_DTYPES
            ):
                return "views"
        elif unrounded and all(DTYPES[name][0].is_floating_point for name in stored):
            return "views"
    return "slices" if method.elementwise else "read"


def merge_task(
    plan: MergePlan,
    task: TensorTask,
    sources: Mapping[str, ModelSource],
    mode: InputMode,
    inputs: list[torch.Tensor] | None = None,
    *,
    observe: Observer | None = None,
) -> torch.Tensor:
    """One output tensor, its inputs reaching the method as ``mode`` says (``read``: ``inputs``).

    ``observe``: called with the views of the inputs before they are merged (not in ``read`` mode).
    """
    if mode == "read":
        if inputs is None:
            raise ValueError("read mode needs the inputs")
        return combine(plan, task, inputs)
    if mode == "slices":
        return combine_by_slices(plan, task, sources, observe)
    return combine_from_views(plan, task, sources, observe)


def combine_from_views(
    plan: MergePlan, task: TensorTask, sources: Mapping[str, ModelSource], observe: Observer | None = None
) -> torch.Tensor:
    """Merge one tensor with a streaming method, its inputs zero-copy views of the files."""
    large = math.prod(task.shape) * DTYPES[task.dtype][1] >= RELEASE_BYTES
    parts = [
        (drop, item.tensor)
        for item in task.inputs
        if large and (drop := getattr(sources[item.model], "release_part", None)) is not None
    ]

    def release(start: int, end: int) -> None:
        for release_part, name in parts:
            release_part(name, start, end)

    with ExitStack() as stack:
        views = [stack.enter_context(sources[i.model].view(i.tensor)) for i in task.inputs]  # type: ignore[attr-defined]
        if observe is not None:
            observe(views)
        return combine(plan, task, views, release if parts else None)


def combine_by_slices(
    plan: MergePlan, task: TensorTask, sources: Mapping[str, ModelSource], observe: Observer | None = None
) -> torch.Tensor:
    """Merge an elementwise method slice by slice from zero-copy views of the inputs.

    Gives exactly the numbers of :func:`combine` (each element sees the same operations),
    but no input ever exists whole in float32: each slice is converted, merged and written
    into the output while it is still in the CPU cache. Slices are spread over the cores,
    each running single-threaded torch ops: many small ops under torch's own intra-op
    threading spend more time in thread barriers than in arithmetic on a busy machine.
    """
    compute = torch.float64 if task.read_dtype == "F64" else torch.float32
    round_to = DTYPES[task.read_dtype][0] if task.read_dtype else None
    out = buffers.empty(task.shape, DTYPES[task.dtype][0])
    flat_out = out.reshape(-1)
    total = flat_out.numel()
    with ExitStack() as stack:
        views = [stack.enter_context(sources[i.model].view(i.tensor)).reshape(-1) for i in task.inputs]  # type: ignore[attr-defined]
        if observe is not None:
            observe(views)

        def merge_slice(start: int) -> None:
            end = min(start + SLICE_ELEMENTS, total)
            parts = []
            for view in views:
                part = view[start:end]
                if round_to is not None:
                    part = part.to(round_to)
                parts.append(part.to(compute, copy=True))  # never a view into the read-only map
            call = _call(task, parts)
            flat_out[start:end] = plan.method.merge(call)

        starts = range(0, total, SLICE_ELEMENTS)
        try:
            map_on_cores(merge_slice, starts, parallel=len(starts) > 1)
        except ValueError as exc:
            raise RecipeError.single("parameters", f"{exc} (tensor '{task.name}')") from None
    return out


def read_inputs(
    task: TensorTask, sources: Mapping[str, ModelSource], device: torch.device
) -> list[torch.Tensor]:
    """One output tensor's inputs, rounded to the recipe's ``dtype`` and held in the compute dtype."""
    if not DTYPES[task.dtype][0].is_floating_point:
        # integer buffers (position ids, masks) are not averaged: the donor's copy is kept
        src = task.inputs[task.base_index if task.base_index is not None else 0]
        return [sources[src.model].read(src.tensor)]
    compute = torch.float64 if task.read_dtype == "F64" else torch.float32
    round_to = DTYPES[task.read_dtype][0] if task.read_dtype else None
    tensors = []
    for item in task.inputs:
        t = sources[item.model].read(item.tensor, round_to or compute)
        if round_to is not None and round_to != compute:
            t = t.to(compute)
        tensors.append(t.to(device, non_blocking=True))
    return tensors


def _call(
    task: TensorTask, tensors: list[torch.Tensor], release: Callable[[int, int], None] | None = None
) -> MergeCall:
    """What a method sees for one tensor (or one slice of it): the inputs and resolved numbers."""
    return MergeCall(
        tensors=tensors,
        base_index=task.base_index,
        params=task.params,
        input_params=task.input_params,
        seeds=task.seeds,
        tensor_name=task.name,
        out_dtype=DTYPES[task.dtype][0],
        release=release,
    )


def combine(
    plan: MergePlan,
    task: TensorTask,
    tensors: list[torch.Tensor],
    release: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Merge one tensor's inputs with the plan's method; the result is in the output dtype."""
    out_dtype = DTYPES[task.dtype][0]
    if not out_dtype.is_floating_point:
        return tensors[0].to(out_dtype)
    if task.vocab_axis is not None and plan.vocab is not None:
        base = task.inputs[task.base_index].model if task.base_index is not None else None
        tensors = align_rows(plan.vocab, [item.model for item in task.inputs], tensors, base)
    call = _call(task, tensors, release)
    try:
        merged = plan.method.merge(call)
    except ValueError as exc:
        raise RecipeError.single("parameters", f"{exc} (tensor '{task.name}')") from None
    return merged.to(out_dtype)


def merge_tensor(
    plan: MergePlan, task: TensorTask, sources: Mapping[str, ModelSource], device: torch.device
) -> torch.Tensor:
    """Read one output tensor's inputs and merge them (no overlap; for tests and tools)."""
    return combine(plan, task, read_inputs(task, sources, device))


def _check_destination(out: str, overwrite: bool) -> None:
    if os.path.isfile(out):
        raise OutputError(out, "it is a file; give a folder path")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise OutputError(out, "the folder exists and is not empty; choose another path or pass --overwrite")


def _publish(staging: str, out: str, overwrite: bool) -> None:
    """Move the finished output into place; an existing folder is replaced only at the very end."""
    try:
        if os.path.isdir(out):
            if os.listdir(out) and not overwrite:
                raise OutputError(out, "the folder appeared while merging; nothing was changed")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
            os.rename(out, os.path.join(old, "previous"))
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out)
    except OSError as exc:
        raise OutputError(out, exc.strerror or str(exc)) from None


def _write_side_files(
    config: MergeConfig,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    folder: str,
    options: MergeOptions,
) -> None:
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(plan.output_config), f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(folder, RECIPE_NAME), "w", encoding="utf-8") as f:
        f.write(config.to_yaml())

    donor = sources[plan.donor]
    if "generation_config.json" in donor.files():
        _copy(donor, "generation_config.json", folder)
    if plan.vocab is not None:
        # the output's rows follow this tokenizer: it is written even with copy_tokenizer off, as mergekit does
        from engine.tokenizer import write_tokenizer

        write_tokenizer(plan.vocab, sources, folder)
    elif options.copy_tokenizer:
        tok_source = sources[plan.donor]
        available = set(tok_source.files())
        for name in TOKENIZER_FILES:
            if name in available:
                _copy(tok_source, name, folder)
    else:
        return
    if config.chat_template:
        _write_chat_template(config.chat_template, sources, folder)


def _copy(source: ModelSource, name: str, folder: str) -> None:
    with open(os.path.join(folder, name), "wb") as f:
        f.write(source.read_file(name))


def _write_chat_template(template: str, sources: Mapping[str, ModelSource], folder: str) -> None:
    """``auto`` takes the template most of the models use; ``chatml`` is built in; else a Jinja text."""
    if template == "auto":
        found = []
        for src in sources.values():
            if "chat_template.jinja" in src.files():
                found.append(src.read_file("chat_template.jinja").decode("utf-8"))
            elif "tokenizer_config.json" in src.files():
                tok = json.loads(src.read_file("tokenizer_config.json"))
                if isinstance(tok.get("chat_template"), str):
                    found.append(tok["chat_template"])
        if not found:
            log.warning("chat_template: auto found no chat template in any model; none written")
            return
        text = Counter(found).most_common(1)[0][0]
    elif template == "chatml":
        text = CHATML
    elif "{" in template:
        text = template
    else:
        raise RecipeError.single(
            "chat_template",
            f"'{template}' is not a known template; use auto, chatml, or a Jinja template text",
        )
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(text)
    # a template in tokenizer_config.json would take precedence over the file; drop it
    tok_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(tok_path):
        with open(tok_path, encoding="utf-8") as f:
            tok = json.load(f)
        if tok.pop("chat_template", None) is not None:
            with open(tok_path, "w", encoding="utf-8") as f:
                json.dump(tok, f, indent=2)
