"""Extract a PEFT LoRA adapter from a fine-tune: the best rank-r approximation of each weight delta.

For every 2-D weight ``W`` the fine-tune changed, the delta ``D = W_ft - W_base`` is taken in
float32 and factored by a truncated SVD (Eckart–Young: no rank-r matrix is closer to ``D`` in
Frobenius norm)::

    D = U S Vh                             # D: [out, in], U: [out, k], S: [k], Vh: [k, in]
    B = U[:, :r] sqrt(S[:r])               # lora_B.weight: [out, r]
    A = sqrt(S[:r]) Vh[:r]                 # lora_A.weight: [r, in]
    D ≈ B @ A                              # error ||D - B A||_F = sqrt(sum(S[r:]^2))

``lora_alpha`` equals each module's rank, so PEFT's scale ``alpha / r`` is 1. An input
embedding follows PEFT's embedding convention: the update is ``(B @ A).T``, so ``D.T`` is
factored into ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r]. A tied output
head the checkpoint does not store gets the same factors transposed, with ``ensure_weight_tying``,
as PEFT saves them (PEFT 0.21.2 then runs the adapter right, but its ``merge_and_unload`` adds
the tied update twice; the engine's ``base+adapter`` reader adds it once).

Which tensors go where:

- a module named (by PEFT's rule: its path ends with the name) in ``modules_to_save`` is
  saved whole from the fine-tune, with all its tensors and those of its children;
- every other 2-D ``.weight`` (linear layers, ``lm_head``, embeddings) gets a LoRA, unless
  its delta is exactly zero, or ``include``/``exclude`` regular expressions leave it out;
  with ``embed_lora=False`` the embeddings are saved whole instead, as mergekit does by default;
- 1-D tensors (norms, biases) and tensors of 3 or more dimensions are never decomposed:
  those the fine-tune changed (and changed weights that ``include``/``exclude`` leave out)
  are listed in the notes; name their module in
  ``modules_to_save`` to carry them whole.

Tensors are read one module at a time through the engine's sources (local folders, Hub
repos, ``base+adapter``), and each module's factors go to a spill file on disk as they are
made: peak memory is about ten to twelve float32 copies of the largest weight (both inputs, the delta,
``U``/``S``/``Vh``, LAPACK's workspace, the factors), whatever the size of the model or the adapter. The output folder is built
beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import torch

from engine.architecture import TIED_HEADS, is_pre_weight
from engine.errors import IncompatibleModelsError, MergeError, OutputError
from engine.run import _check_destination, _publish, resolve_device
from engine.sources import ModelSource, TensorInfo, open_model
from engine.sources.hub import parse_hub_reference
from engine.sources.safetensors_file import TORCH_TO_CODE

__all__ = [
    "ExtractOptions",
    "ExtractResult",
    "ExtractedModule",
    "extract_lora",
    "low_rank_factors",
    "model_card",
    "parse_rank_per_module",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
OutDType = Literal["float32", "bfloat16", "float16"]
_OUT_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract an adapter (which models: the arguments of :func:`extract_lora`).

    ``rank_per_module`` maps a module pattern to its rank; a pattern matches a module whose
    path ends with it after a dot (PEFT's ``rank_pattern`` rule: ``q_proj``,
    ``layers\\.0\\.mlp\\.down_proj``); the first match in order wins, other modules get ``rank``.
    A module's rank is never more than the smaller side of its weight.
    """

    rank: int
    rank_per_module: Mapping[str, int] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    embed_lora: bool = True
    include: tuple[str, ...] = ()  # regular expressions searched in tensor names; none: all
    exclude: tuple[str, ...] = ()
    dtype: OutDType = "float32"
    device: str = "auto"
    overwrite: bool = False
    allow_pickle: bool = False
    hub_endpoint: str | None = None
    hub_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_rank("--rank", self.rank)
        for pattern, rank in self.rank_per_module.items():
            _check_rank(f"--rank-per-module {pattern}", rank)
        for flag, patterns in (
            ("--rank-per-module", tuple(self.rank_per_module)),
            ("--include-regex", self.include),
            ("--exclude-regex", self.exclude),
        ):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise MergeError(f"{flag}: '{pattern}' is not a regular expression ({exc})") from None
        if self.dtype not in _OUT_DTYPES:
            raise MergeError(f"--dtype must be one of {', '.join(_OUT_DTYPES)}, not '{self.dtype}'")


def _check_rank(flag: str, rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise MergeError(f"{flag} must be a positive whole number, not {rank!r}")


@dataclass(frozen=True)
class ExtractedModule:
    """One module's LoRA: its rank and how far ``B @ A`` is from the delta (Frobenius norms)."""

    module: str
    kind: Literal["linear", "embedding"]
    rank: int
    error: float  # ||D - B A||_F, from the discarded singular values
    delta_norm: float  # ||D||_F

    @property
    def relative_error(self) -> float:
        return self.error / self.delta_norm if self.delta_norm else 0.0


@dataclass(frozen=True)
class ExtractResult:
    out_path: str
    modules: tuple[ExtractedModule, ...]
    saved: tuple[str, ...]  # tensor names saved whole (modules_to_save)
    bytes_written: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Target:
    tensor: str  # e.g. model.layers.0.self_attn.q_proj.weight
    module: str
    kind: Literal["linear", "embedding"]
    rank: int


@dataclass(frozen=True)
class _Plan:
    targets: tuple[_Target, ...]
    saved: tuple[str, ...]
    watched: tuple[str, ...]  # tensors never decomposed: noted when they differ
    modules_to_save: tuple[str, ...]  # as written in adapter_config.json
    tied: Mapping[str, str] = field(default_factory=dict)  # embedding -> the output head it stands for


def parse_rank_per_module(text: str) -> dict[str, int]:
    """``q_proj=8,v_proj=16`` (also ``q_proj:8``, separated by commas or spaces) -> patterns and ranks.

    Raises:
        MergeError: an item is not ``PATTERN=RANK`` with a positive whole rank.
    """
    ranks: dict[str, int] = {}
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        pattern, sep, value = item.rpartition("=") if "=" in item else item.rpartition(":")
        if not sep or not pattern or not re.fullmatch(r"\d+", value):
            raise MergeError(
                f"--rank-per-module: '{item}' is not PATTERN=RANK; write e.g. q_proj=8,v_proj=16"
            )
        _check_rank(f"--rank-per-module {pattern}", int(value))
        ranks[pattern] = int(value)
    if not ranks:
        raise MergeError("--rank-per-module is empty; write e.g. q_proj=8,v_proj=16")
    return ranks


# -- planning (headers and configs only) -------------------------------------------------------


def _module_paths(names: Iterable[str]) -> set[str]:
    """Every module path that owns a tensor, and all their ancestors."""
    paths: set[str] = set()
    for name in names:
        parts = name.split(".")[:-1]
        for end in range(1, len(parts) + 1):
            paths.add(".".join(parts[:end]))
    return paths


def _saved_by(module: str, names: Sequence[str]) -> bool:
    """PEFT's ``modules_to_save`` rule: a module whose path ends with a name is saved, children included."""
    parts = module.split(".")
    return any(".".join(parts[:end]).endswith(n) for end in range(1, len(parts) + 1) for n in names)


def _rank_for(module: str, options: ExtractOptions) -> int:
    for pattern, rank in options.rank_per_module.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return rank
    return options.rank


def _check_models(base: ModelSource, model: ModelSource) -> dict[str, TensorInfo]:
    """The fine-tune must be the base's architecture with the same tensors and shapes."""
    refs = [base.reference, model.reference]
    base_cfg, model_cfg = base.config(), model.config()
    for key in ("architectures", "model_type"):
        if base_cfg.get(key) != model_cfg.get(key):
            raise IncompatibleModelsError(
                f"The fine-tune '{model.reference}' is not of the base's architecture: {key} is "
                f"{model_cfg.get(key)} there and {base_cfg.get(key)} in '{base.reference}'.",
                models=refs,
                field="architecture",
            )
    base_tensors, model_tensors = base.tensors(), model.tensors()
    for have, lack, ref in (
        (base_tensors, model_tensors, model.reference),
        (model_tensors, base_tensors, base.reference),
    ):
        missing = [n for n in have if n not in lack]
        if missing:
            shown = ", ".join(f"'{n}'" for n in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise IncompatibleModelsError(
                f"'{ref}' lacks {len(missing)} tensor(s) the other model has ({shown}): "
                "the two are not a base and a fine-tune of it.",
                models=refs,
                field="tensor names",
            )
    for name, info in base_tensors.items():
        if model_tensors[name].shape != info.shape:
            raise IncompatibleModelsError(
                f"'{name}' is {list(model_tensors[name].shape)} in '{model.reference}' but "
                f"{list(info.shape)} in '{base.reference}': a delta needs equal shapes "
                "(a resized vocabulary cannot be extracted as a LoRA of this base).",
                models=refs,
                field="shape",
            )
    return base_tensors


def _plan(tensors: Mapping[str, TensorInfo], config: Mapping[str, Any], options: ExtractOptions) -> _Plan:
    names = list(tensors)
    modules = _module_paths(names)
    to_save = list(options.modules_to_save)
    for wanted in to_save:
        if not any(m.endswith(wanted) for m in modules):
            raise MergeError(f"--modules-to-save: '{wanted}' names no module of the base model")
    embeddings = [n for n in names if is_pre_weight(n) and len(tensors[n].shape) == 2]
    if not options.embed_lora:
        for name in embeddings:
            leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
            if not _saved_by(name.removesuffix(".weight"), to_save):
                to_save.append(leaf)
    targets: list[_Target] = []
    saved: list[str] = []
    watched: list[str] = []
    for name in names:
        module, _, param = name.rpartition(".")
        shape = tensors[name].shape
        if _saved_by(module, to_save):
            saved.append(name)
        elif len(shape) == 2 and param == "weight":
            chosen = (not options.include or any(re.search(p, name) for p in options.include)) and not any(
                re.search(p, name) for p in options.exclude
            )
            if chosen:
                kind: Literal["linear", "embedding"] = "embedding" if name in embeddings else "linear"
                targets.append(_Target(name, module, kind, min(_rank_for(module, options), *shape)))
            else:
                watched.append(name)  # left out by include/exclude: noted if it differs
        else:
            watched.append(name)
    targets_modules = {t.module for t in targets}
    for pattern in options.rank_per_module:
        if not any(re.match(rf"(.*\.)?({pattern})$", m) for m in targets_modules):
            raise MergeError(f"--rank-per-module: '{pattern}' matches no module that gets a LoRA")
    tied: dict[str, str] = {}
    if config.get("tie_word_embeddings"):
        adapted = {t.tensor for t in targets} | set(saved)
        for head, embeddings_of in TIED_HEADS.items():
            for embedding in embeddings_of:
                if head not in tensors and embedding in adapted:
                    tied[embedding] = head
    return _Plan(tuple(targets), tuple(saved), tuple(watched), tuple(to_save), tied)


def _target_modules(extracted: Sequence[str], all_modules: set[str]) -> list[str]:
    """Leaf names where they select exactly the extracted modules (PEFT's suffix rule), else full paths."""
    chosen = set(extracted)
    by_leaf: dict[str, list[str]] = {}
    for module in extracted:
        by_leaf.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    out: list[str] = []
    for leaf, members in sorted(by_leaf.items()):
        matched = {m for m in all_modules if m == leaf or m.endswith(f".{leaf}")}
        out.extend([leaf] if matched <= chosen else sorted(members))
    return out


# -- factorisation ----------------------------------------------------------------------------


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``delta`` [out, in] and all its singular values.

    Returns:
        ``(B, A, S)``: B [out, r] and A [r, in] with ``B @ A`` the truncated SVD of ``delta``
        (each side carries ``sqrt(S)``), and S every singular value, largest first.
    """
    if delta.shape[0] < delta.shape[1]:
        # LAPACK factors a row-major matrix as its transpose: a wide one costs several times a tall one
        v, s, uh = torch.linalg.svd(delta.T, full_matrices=False)  # v: [in, k], uh: [k, out]
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # u: [out, k], s: [k], vh: [k, in]
    root = s[:rank].sqrt()
    b = u[:, :rank] * root  # [out, r]
    a = root[:, None] * vh[:rank]  # [r, in]
    return b, a, s


class _SpillFile:
    """Tensors appended to a data file as they come; the safetensors header is written last."""

    def __init__(self, folder: str) -> None:
        self._data_path = os.path.join(folder, ".adapter.data")
        self._data: BinaryIO = open(self._data_path, "wb")  # noqa: SIM115 - closed by finish/close
        self._entries: dict[str, dict[str, Any]] = {}
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous()
        raw: Any = data.reshape(-1).view(torch.uint8).numpy()
        self._data.write(raw)
        nbytes = data.numel() * data.element_size()
        self._entries[name] = {
            "dtype": TORCH_TO_CODE[data.dtype],
            "shape": list(data.shape),
            "data_offsets": [self._size, self._size + nbytes],
        }
        self._size += nbytes

    def finish(self, path: str) -> int:
        """Write the safetensors file at ``path``; returns its size in bytes."""
        self._data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._entries}, separators=(",", ":"))
        raw = header.encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(raw).to_bytes(8, "little") + raw)
            shutil.copyfileobj(data, out, 16 << 20)
        os.remove(self._data_path)
        return 8 + len(raw) + self._size

    def close(self) -> None:
        self._data.close()


def extract_lora(
    base: str,
    model: str,
    out_path: str | os.PathLike[str],
    options: ExtractOptions,
    *,
    progress: Progress | None = None,
) -> ExtractResult:
    """Write a PEFT LoRA adapter that turns ``base`` into (approximately) ``model``.

    Args:
        base, model: model references as in a recipe (a folder, ``org/name[@revision]``, or
            ``base+adapter``).
        out_path: the adapter's folder (created; must not hold files unless ``overwrite``).
        options: ranks, which modules to save whole, output dtype, device.
        progress: called with (done, total, tensor name) after each tensor.

    Returns:
        What was extracted, with each module's rank and approximation error.

    Raises:
        MergeError: a subclass naming what to fix (options, models that are not a base and its
            fine-tune, an occupied output folder); nothing is left at ``out_path``.
    """
    out = os.path.abspath(os.fspath(out_path))
    _check_destination(out, options.overwrite)
    device = resolve_device(options.device)
    out_dtype = _OUT_DTYPES[options.dtype]
    with ExitStack() as stack:
        sources = []
        for ref in (base, model):
            source = open_model(
                ref,
                allow_pickle=options.allow_pickle,
                hub_endpoint=options.hub_endpoint,
                hub_token=options.hub_token,
            )
            stack.callback(source.close)
            sources.append(source)
        base_src, model_src = sources
        tensors = _check_models(base_src, model_src)
        plan = _plan(tensors, base_src.config(), options)
        parent = os.path.dirname(out)
        try:
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
        except OSError as exc:
            raise OutputError(out, exc.strerror or str(exc)) from None
        try:
            spill = _SpillFile(staging)
            stack.callback(spill.close)
            extracted, notes = _stream(plan, base_src, model_src, spill, device, out_dtype, progress)
            size = spill.finish(os.path.join(staging, ADAPTER_WEIGHTS))
            config = _adapter_config(base, base_src.config(), plan, extracted, tensors, options)
            with open(os.path.join(staging, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card(base, model, extracted))
            _publish(staging, out, options.overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    for note in notes:
        log.info("%s", note)
    return ExtractResult(out, tuple(extracted), plan.saved, size, tuple(notes))


def _stream(
    plan: _Plan,
    base: ModelSource,
    model: ModelSource,
    spill: _SpillFile,
    device: torch.device,
    out_dtype: torch.dtype,
    progress: Progress | None,
) -> tuple[list[ExtractedModule], list[str]]:
    total = len(plan.targets) + len(plan.saved) + len(plan.watched)
    done = 0
    extracted: list[ExtractedModule] = []
    unchanged: list[str] = []
    for target in plan.targets:
        delta = model.read(target.tensor, torch.float32).to(device)
        delta -= base.read(target.tensor, torch.float32).to(device)  # [out, in] ([vocab, dim] for embeddings)
        if not torch.any(delta):
            unchanged.append(target.module)
        else:
            if target.kind == "embedding":
                delta = delta.T  # PEFT's embedding update is (B @ A).T: factor D.T [dim, vocab]
            b, a, s = low_rank_factors(delta, target.rank)
            del delta
            kind = "lora_embedding" if target.kind == "embedding" else "lora"
            suffix = "" if target.kind == "embedding" else ".weight"
            spill.add(f"{_PREFIX}{target.module}.{kind}_A{suffix}", a.to(out_dtype))
            spill.add(f"{_PREFIX}{target.module}.{kind}_B{suffix}", b.to(out_dtype))
            head = plan.tied.get(target.tensor)
            if head is not None:
                # PEFT's ensure_weight_tying: the tied head's LoRA is the embedding's, transposed
                head_module = head.removesuffix(".weight")
                spill.add(f"{_PREFIX}{head_module}.lora_A.weight", b.T.to(out_dtype))  # [r, dim]
                spill.add(f"{_PREFIX}{head_module}.lora_B.weight", a.T.to(out_dtype))  # [vocab, r]
            s64 = s.double()
            extracted.append(
                ExtractedModule(
                    target.module,
                    target.kind,
                    target.rank,
                    error=float(s64[target.rank :].square().sum().sqrt()),
                    delta_norm=float(s64.square().sum().sqrt()),
                )
            )
        done += 1
        if progress is not None:
            progress(done, total, target.tensor)
    for name in plan.saved:
        whole = model.read(name).to(out_dtype)
        spill.add(f"{_PREFIX}{name}", whole)
        if name in plan.tied:
            spill.add(f"{_PREFIX}{plan.tied[name]}", whole)  # PEFT saves the tied head too
        done += 1
        if progress is not None:
            progress(done, total, name)
    changed = []
    for name in plan.watched:
        if not torch.equal(model.read(name, torch.float32), base.read(name, torch.float32)):
            changed.append(name)
        done += 1
        if progress is not None:
            progress(done, total, name)
    if not extracted and not plan.saved:
        raise IncompatibleModelsError(
            f"'{model.reference}' has no weight that differs from '{base.reference}' where a LoRA "
            "could hold it: there is nothing to extract.",
            models=[base.reference, model.reference],
        )
    notes = []
    if unchanged:
        notes.append(f"{len(unchanged)} module(s) are the same in both models and get no LoRA")
    if changed:
        shown = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")
        notes.append(
            f"{len(changed)} tensor(s) differ but have no LoRA (1-D, or left out by include/exclude), "
            f"so the adapter leaves them at the base's values ({shown}); name their modules in "
            "--modules-to-save to keep them"
        )
    return extracted, notes


def _adapter_config(
    base: str,
    base_config: Mapping[str, Any],
    plan: _Plan,
    extracted: Sequence[ExtractedModule],
    tensors: Mapping[str, TensorInfo],
    options: ExtractOptions,
) -> dict[str, Any]:
    different = {m.module: m.rank for m in extracted if m.rank != options.rank}
    for m in extracted:
        head = plan.tied.get(f"{m.module}.weight")
        if head is not None and m.rank != options.rank:
            different[head.removesuffix(".weight")] = m.rank  # the tied head's LoRA has the same rank
    architectures = base_config.get("architectures") or []
    causal = any(str(a).endswith("ForCausalLM") for a in architectures)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": _base_id(base)[0],
        "revision": _base_id(base)[1],
        "r": options.rank,
        "lora_alpha": options.rank,
        "rank_pattern": different,
        "alpha_pattern": different,
        "target_modules": _target_modules([m.module for m in extracted], _module_paths(tensors)),
        "modules_to_save": list(plan.modules_to_save) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    written = {f"{m.module}.weight" for m in extracted} | set(plan.saved)
    if any(embedding in written for embedding in plan.tied):
        # the output head shares the embedding's weight: PEFT adapts both alike, merged or not
        config["ensure_weight_tying"] = True
    return config


def _base_id(base: str) -> tuple[str, str | None]:
    """(name, revision) of the base as PEFT and the Hub write it: a repo id without ``@revision``."""
    hub = parse_hub_reference(base) if not os.path.isdir(base) else None
    return hub if hub is not None else (base, None)


def model_card(base: str, model: str, extracted: Sequence[ExtractedModule]) -> str:
    """README.md of an extracted adapter: Hub metadata naming its base, and how it was made."""
    base_id, _ = _base_id(base)
    ranks = sorted({m.rank for m in extracted})
    shown_ranks = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    errors = [m.relative_error for m in extracted]
    mean_error = sum(errors) / len(errors) if errors else 0.0
    return (
        "---\n"
        f"base_model: {json.dumps(base_id)}\n"
        "base_model_relation: adapter\n"
        "library_name: peft\n"
        "tags:\n- mergebot\n- lora\n- extracted-lora\n"
        "---\n\n"
        f"# LoRA extracted from {model}\n\n"
        f"A PEFT LoRA adapter for [{base_id}]({base_id}), extracted by mergebot from `{model}`: "
        f"each weight's difference from the base, reduced to rank {shown_ranks} by a truncated SVD "
        f"({len(extracted)} modules; mean relative Frobenius error {mean_error:.3g}).\n\n"
        "```python\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n\n"
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_id!r}), 'this-adapter')\n"
        "```\n"
    )
