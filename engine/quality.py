"""A merge's quality check: does the merged model still work as well as its parents?

Two measurements, each on one model at a time (the merge, then each parent, each freed before
the next is loaded), so the check's memory is one model's:

- **perplexity** on a short English text shipped with mergebot (``engine/data/quality_text.txt``,
  written for it; at most :attr:`QualityOptions.max_tokens` tokens);
- **greedy generations** on a few short prompts (through the tokenizer's chat template when it
  has one; at most :attr:`QualityOptions.max_new_tokens` tokens each), each checked for
  degenerate output: empty, mostly non-text characters, or mostly repeated n-grams.

The verdict compares the merge with its parents, so that models that are weak to begin with
(tiny random ones, base models that ramble) are not blamed on the merge. The check fails when

- the merge's perplexity is not finite, or above :data:`PPL_RATIO` times its best parent's
  *and* above the floor :data:`PPL_FLOOR` (on a text this short, a very low perplexity can
  double without meaning anything); or
- most of the merge's generations (more than half) are degenerate, and at least
  :data:`DEGENERATE_MARGIN` more of them than of any parent's. One odd generation is not
  enough: a greedy continuation of a short prompt can loop in a sound model too, and small
  models' generations vary with any change of weights (a sound merge of two tiny random
  models loops on one prompt more than its parents about as often as not).

A model folder without a tokenizer (or not a causal language model) is not checked: the
report's status is ``skipped``, with the reason; that is not a failure.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from engine.run import resolve_device
from engine.sources import LocalModel, ModelSource, open_model

log = logging.getLogger(__name__)

TEXT_PATH = Path(__file__).parent / "data" / "quality_text.txt"
TEXT_NAME = "mergebot quality text"  # the dataset's name on cards
PPL_RATIO = 1.5  # the merge fails above this times its best parent's perplexity...
PPL_FLOOR = 10.0  # ...when its perplexity is also above this
REPEAT_NGRAM = 3  # repetition is measured on token n-grams of this length
REPEAT_SHARE = 0.5  # a generation whose n-grams are more than this share repeats is degenerate
DEGENERATE_MARGIN = 2  # how many more degenerate generations than its worst parent fail a merge
NON_TEXT_SHARE = 0.1  # ...or whose characters are more than this share control/replacement characters
PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "Here is a short list of fruits:",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_LOADED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")  # tokenizer and generation files

Status = Literal["passed", "failed", "skipped"]


@dataclass(frozen=True)
class QualityOptions:
    """How much the check reads and generates; the defaults keep it to seconds on small models."""

    max_tokens: int = 2048  # of the text, for perplexity
    block: int = 256  # tokens per forward pass (capped by the model's max_position_embeddings)
    max_new_tokens: int = 32  # per prompt
    prompts: tuple[str, ...] = PROMPTS
    device: str = "cpu"  # cpu, cuda, cuda:N or auto


@dataclass(frozen=True)
class Generation:
    """One prompt's greedy continuation; ``problem`` says why it is degenerate (None: it is not)."""

    prompt: str
    text: str
    problem: str | None = None


@dataclass(frozen=True)
class ModelQuality:
    """One model's figures: perplexity on the text (over ``tokens`` predicted tokens) and generations."""

    reference: str
    perplexity: float
    tokens: int
    generations: tuple[Generation, ...] = ()

    @property
    def degenerate(self) -> int:
        """How many of the generations are degenerate."""
        return sum(g.problem is not None for g in self.generations)


@dataclass(frozen=True)
class QualityReport:
    """The check's verdict and figures (``merge`` is None when it was skipped)."""

    status: Status
    reasons: tuple[str, ...] = ()  # why it failed or was skipped
    merge: ModelQuality | None = None
    parents: tuple[ModelQuality, ...] = ()
    ratio: float = PPL_RATIO
    floor: float = PPL_FLOOR
    text: str = TEXT_NAME

    @property
    def passed(self) -> bool:
        """True unless the check ran and failed (a skipped check does not block anything)."""
        return self.status != "failed"

    @property
    def best_parent(self) -> ModelQuality | None:
        """The parent with the lowest perplexity."""
        finite = [p for p in self.parents if math.isfinite(p.perplexity)]
        return min(finite, key=lambda p: p.perplexity) if finite else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (non-finite perplexities become None)."""
        out = asdict(self)
        for model in [out["merge"], *out["parents"]]:
            if model is not None and not math.isfinite(model["perplexity"]):
                model["perplexity"] = None
        return out

    def summary(self) -> str:
        """One line: the verdict, and the perplexities of the merge and its best parent."""
        if self.status == "skipped":
            return f"quality check skipped: {'; '.join(self.reasons)}"
        assert self.merge is not None
        best = self.best_parent
        versus = f" (best parent {best.reference}: {_ppl(best.perplexity)})" if best else ""
        line = f"quality check {self.status}: perplexity {_ppl(self.merge.perplexity)}{versus}"
        return line + (f"; {'; '.join(self.reasons)}" if self.reasons else "")

    def markdown(self) -> str:
        """A short markdown table: perplexity and degenerate generations of the merge and each parent."""
        if self.status == "skipped" or self.merge is None:
            return f"Quality check skipped: {'; '.join(self.reasons)}."
        rows = [("this merge", self.merge), *((f"`{p.reference}`", p) for p in self.parents)]
        lines = [
            f"Quality check: **{self.status}** (perplexity on the {self.text}, {self.merge.tokens} tokens; "
            f"degenerate greedy generations out of {len(self.merge.generations)} prompts).",
            "",
            "| model | perplexity | degenerate generations |",
            "|---|---:|---:|",
            *(f"| {name} | {_ppl(m.perplexity)} | {m.degenerate} |" for name, m in rows),
        ]
        if self.reasons:
            lines += ["", *(f"- {reason}" for reason in self.reasons)]
        return "\n".join(lines)


def _ppl(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "∞"


def quality_text() -> str:
    """The shipped English text the perplexities are measured on."""
    return TEXT_PATH.read_text(encoding="utf-8")


def degenerate_problem(text: str, token_ids: Sequence[int]) -> str | None:
    """Why a generation is degenerate, or None.

    Degenerate: empty (after stripping whitespace); more than :data:`NON_TEXT_SHARE` of its
    characters are replacement or control characters (other than whitespace); or more than
    :data:`REPEAT_SHARE` of its token :data:`REPEAT_NGRAM`-grams repeat an earlier one.
    """
    stripped = text.strip()
    if not stripped:
        return "empty output"
    odd = sum(
        ch == "\ufffd" or (unicodedata.category(ch).startswith("C") and not ch.isspace()) for ch in stripped
    )
    if odd / len(stripped) > NON_TEXT_SHARE:
        return f"{odd} of {len(stripped)} characters are not text"
    grams = [tuple(token_ids[i : i + REPEAT_NGRAM]) for i in range(len(token_ids) - REPEAT_NGRAM + 1)]
    if grams:
        repeated = 1 - len(set(grams)) / len(grams)
        if repeated > REPEAT_SHARE:
            return f"repetitive ({repeated:.0%} of its {REPEAT_NGRAM}-grams repeat)"
    return None


def check_quality(
    merged: str | os.PathLike[str],
    parents: Sequence[str] = (),
    *,
    options: QualityOptions | None = None,
    base_dir: str | None = None,
    hub_endpoint: str | None = None,
    hub_token: str | None = None,
    scratch_dir: str | os.PathLike[str] | None = None,
) -> QualityReport:
    """Measure a merged model folder against its parents and give the verdict (see the module doc).

    Args:
        merged: the merge's output folder (config.json, safetensors, tokenizer files).
        parents: the parents' recipe references (folders, ``org/name[@rev]`` Hub ids, ``base+lora``),
            read through :func:`engine.sources.open_model`; a parent without a tokenizer is
            measured with the merge's.
        options: sizes and device (default :class:`QualityOptions`).
        base_dir, hub_endpoint, hub_token: as for :func:`engine.sources.open_model`.
        scratch_dir: where a parent that is not a local safetensors folder (a Hub repo, a LoRA) is
            written for transformers to load, one at a time, deleted after use (default: the
            system's temporary folder).

    Returns:
        The report; ``skipped`` when the merge has no tokenizer or is not a causal language model.

    Raises:
        engine.errors.ModelNotFoundError: a parent cannot be read.
        engine.errors.MergeError: ``options.device`` asks for CUDA and there is none.
    """
    opts = options or QualityOptions()
    folder = str(merged)
    tokenizer, why = _load_tokenizer(folder)
    if tokenizer is None:
        return QualityReport("skipped", (why,))
    device = resolve_device(opts.device)
    text = quality_text()
    try:
        merge = _measure("this merge", folder, tokenizer, text, opts, device)
    except ValueError as exc:  # transformers' Auto classes: not a causal LM architecture
        return QualityReport("skipped", (f"the model is not a causal language model ({exc})",))
    measured: list[ModelQuality] = []
    for reference in parents:
        with _parent_folder(reference, base_dir, hub_endpoint, hub_token, scratch_dir) as parent_dir:
            own, _ = _load_tokenizer(parent_dir)
            measured.append(_measure(reference, parent_dir, own or tokenizer, text, opts, device))
    return judge(merge, tuple(measured))


def judge(merge: ModelQuality, parents: Sequence[ModelQuality] = ()) -> QualityReport:
    """The verdict on a merge's figures against its parents' (the rules are in the module doc)."""
    reasons: list[str] = []
    finite = [p.perplexity for p in parents if math.isfinite(p.perplexity)]
    if not math.isfinite(merge.perplexity):
        reasons.append("the merge's perplexity is not finite (its outputs overflow or are NaN)")
    elif finite:
        best = min(finite)
        if merge.perplexity > PPL_RATIO * best and merge.perplexity > PPL_FLOOR:
            reasons.append(
                f"the merge's perplexity {merge.perplexity:.2f} is {merge.perplexity / best:.1f}× its best "
                f"parent's ({best:.2f}); the limit is {PPL_RATIO}×"
            )
    worst = max((p.degenerate for p in parents), default=0)
    if 2 * merge.degenerate > len(merge.generations) and merge.degenerate - worst >= DEGENERATE_MARGIN:
        problems = "; ".join(f"{g.prompt!r}: {g.problem}" for g in merge.generations if g.problem)
        reasons.append(
            f"{merge.degenerate} of the merge's {len(merge.generations)} generations are degenerate "
            f"(at most {worst} of each parent's): {problems}"
        )
    return QualityReport("failed" if reasons else "passed", tuple(reasons), merge, tuple(parents))


def _load_tokenizer(folder: str) -> tuple[Any, str]:
    """(the folder's tokenizer, "") or (None, why not)."""
    if not any(os.path.exists(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
        return None, "the model has no tokenizer"
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False), ""
    except (OSError, ValueError) as exc:
        return None, f"its tokenizer does not load ({type(exc).__name__})"


@contextmanager
def _parent_folder(
    reference: str,
    base_dir: str | None,
    hub_endpoint: str | None,
    hub_token: str | None,
    scratch_dir: str | os.PathLike[str] | None,
) -> Iterator[str]:
    """A folder transformers can load the parent from: its own if it is a local safetensors
    folder, else a temporary one written from its source (one tensor at a time)."""
    source = open_model(reference, base_dir=base_dir, hub_endpoint=hub_endpoint, hub_token=hub_token)
    try:
        if isinstance(source, LocalModel) and any(
            n.endswith(".safetensors") for n in os.listdir(source.path)
        ):
            yield source.path
            return
        with tempfile.TemporaryDirectory(prefix="mergebot-quality-", dir=scratch_dir) as tmp:
            _write_model(source, tmp)
            yield tmp
    finally:
        source.close()


def _write_model(source: ModelSource, folder: str) -> None:
    from safetensors.torch import save_file

    for relative in source.files():
        # Only what transformers reads for a causal LM and its tokenizer (top level, small files:
        # a repo's GGUF or ONNX exports are never fetched); the config is written from the parsed
        # dict, and no code is ever copied.
        if "/" in relative or relative == "config.json" or not relative.endswith(_LOADED_SUFFIXES):
            continue
        target = os.path.join(folder, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(source.read_file(relative))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(source.config(), f)
    tensors = {name: source.read(name).contiguous() for name in source.tensors()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _measure(
    reference: str, folder: str, tokenizer: Any, text: str, opts: QualityOptions, device: torch.device
) -> ModelQuality:
    from transformers import AutoModelForCausalLM

    # float32 on CPU: its half-precision matmuls are many times slower (at twice the memory of a
    # bf16 checkpoint); on an accelerator, the stored dtype
    dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
    try:
        model = model.to(device).eval()
        with torch.inference_mode():
            ppl, tokens = _perplexity(model, tokenizer, text, opts)
            generations = tuple(_generate(model, tokenizer, prompt, opts) for prompt in opts.prompts)
    finally:
        del model
        gc.collect()
    log.info("quality: %s perplexity %.3f over %d tokens", reference, ppl, tokens)
    return ModelQuality(reference, ppl, tokens, generations)


def _perplexity(model: Any, tokenizer: Any, text: str, opts: QualityOptions) -> tuple[float, int]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[: opts.max_tokens]
    bos = tokenizer.bos_token_id
    limit = getattr(model.config, "max_position_embeddings", None) or opts.block
    step = min(opts.block, limit) - (bos is not None)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, len(ids), step):
        block = ([bos] if bos is not None else []) + ids[start : start + step]
        if len(block) < 2:
            continue
        batch = torch.tensor([block], device=device)  # [1, T]
        logits = model(input_ids=batch).logits.float()  # [1, T, V]
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_nll = -logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)  # [1, T-1]
        nll += float(token_nll.sum(dtype=torch.float64))
        count += token_nll.numel()
    if count == 0:
        return math.nan, 0
    mean = nll / count
    return (math.exp(mean) if mean < 700 else math.inf), count  # exp overflows a float past ~709


def _generate(model: Any, tokenizer: Any, prompt: str, opts: QualityOptions) -> Generation:
    from transformers import GenerationConfig

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(
        do_sample=False, max_new_tokens=opts.max_new_tokens, eos_token_id=eos, pad_token_id=pad
    )
    device = next(model.parameters()).device
    batch = torch.tensor([ids], device=device)  # [1, T]
    out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=config)
    new = [int(t) for t in out[0, len(ids) :] if eos is None or int(t) != eos]
    continuation = tokenizer.decode(new, skip_special_tokens=True)
    return Generation(prompt, continuation, degenerate_problem(continuation, new))


__all__ = [
    "PPL_FLOOR",
    "PPL_RATIO",
    "TEXT_NAME",
    "Generation",
    "ModelQuality",
    "QualityOptions",
    "QualityReport",
    "check_quality",
    "degenerate_problem",
    "judge",
    "quality_text",
]
