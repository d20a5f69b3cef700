"""Scoring a model on evaluation data, split once (by seed) into search, held-out report and validation parts.

Kinds (``lm_eval``, lm-evaluation-harness tasks, is in :mod:`engine.evolve.lmeval`):

- ``perplexity``: a text file, tokenized whole and cut into blocks of ``block_size`` tokens; the
  blocks are shuffled with the seed, the first ``search_size`` score trials and the next
  ``report_size`` are held out (then ``validation_size`` more, when asked for). Score: ``exp(total negative log-likelihood / predicted tokens)``,
  lower is better.
- ``exact_match``: a JSONL file of ``{"prompt": ..., "answer": ...}`` items, split the same way.
  The model continues each prompt greedily for ``max_new_tokens`` (default: the answer's length
  in tokens) or until end of text; an item counts when the first line of the continuation,
  stripped, equals the stripped answer. Score: the fraction of items, higher is better.
- ``loglikelihood``: the same items, scored in one teacher-forced pass: an item counts when every
  answer token is the model's most likely next token (lm-eval's ``is_greedy``), or, for items
  with a ``"choices"`` list, when the answer is the choice with the highest total log-likelihood
  (lm-eval's ``acc``). Score: the fraction of items, higher is better.

Prompt and answer are tokenized separately (the prompt with the tokenizer's special tokens, the
answer without) and concatenated, so the answer's tokens do not depend on the prompt.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from transformers import DynamicCache

from engine.evolve.errors import EvaluationDataError, SearchFileError
from engine.evolve.spec import Evaluation

Split = Literal["search", "report", "validation"]
SPLITS: tuple[Split, ...] = ("search", "report", "validation")
Direction = Literal["minimize", "maximize"]


class Tokenizer(Protocol):
    eos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True)
class Item:
    prompt: list[int]
    answer: list[int]
    answer_text: str
    choices: tuple[list[int], ...] = ()
    correct_choice: int = -1


class Evaluator(Protocol):
    """What the search needs of an evaluation: which way is better, the metric's name, a score per split."""

    @property
    def direction(self) -> Direction: ...

    @property
    def metric(self) -> str: ...

    def score(self, model: Any, split: Split) -> float:
        """The model's score on one split."""
        ...


@dataclass(frozen=True)
class FileEvaluator:
    """An evaluation on a data file, with its two splits; call :meth:`score` with a model and a split name."""

    kind: str
    direction: Direction
    splits: dict[str, tuple[Any, ...]]  # split name -> token blocks or items
    batch_size: int
    max_new_tokens: int | None
    eos_token_id: int | None
    pad_token_id: int
    decode: Any

    @property
    def metric(self) -> str:
        return "perplexity" if self.kind == "perplexity" else "accuracy"

    def score(self, model: Any, split: Split) -> float:
        """The model's score on one split (see the module docstring for each kind)."""
        data = self.splits[split]
        with torch.inference_mode():
            if self.kind == "perplexity":
                return _perplexity(model, data, self.batch_size)
            if self.kind == "loglikelihood":
                return _loglikelihood_accuracy(model, data, self.batch_size, self.pad_token_id)
            return _exact_match(
                model,
                data,
                self.max_new_tokens,
                self.eos_token_id,
                self.pad_token_id,
                self.decode,
                self.batch_size,
            )


def load_evaluator(evaluation: Evaluation, tokenizer: Tokenizer, *, seed: int) -> Evaluator:
    """Read the evaluation data, tokenize it and split it into disjoint search and report parts.

    Args:
        evaluation: a validated ``evaluation`` section (paths resolved).
        tokenizer: the base model's tokenizer.
        seed: shuffles the data before it is split (and seeds lm-eval's few-shot sampling).

    Raises:
        EvaluationDataError: the data is unreadable, malformed, or too small for the two splits.
    """
    if evaluation.kind == "lm_eval":
        from engine.evolve.lmeval import load_lm_eval  # the optional extra: imported only when asked for

        return load_lm_eval(evaluation, tokenizer, seed=seed)
    path = evaluation.data
    if path is None:  # validate_search reports this; an Evaluation built by hand may still lack it
        raise SearchFileError.single("evaluation.data", f"is required for kind: {evaluation.kind}")
    units: list[Any]
    if evaluation.kind == "perplexity":
        text = _read_text(path)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        size = evaluation.block_size
        units = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]
        what = f"blocks of {size} tokens ({len(ids)} tokens in all)"
    else:
        units = _read_items(path, tokenizer)
        what = "items"
    indices = split_indices(
        len(units), evaluation, seed, where=path, what=what, fix="lower the sizes or add data"
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return FileEvaluator(
        kind=evaluation.kind,
        direction="minimize" if evaluation.kind == "perplexity" else "maximize",
        splits={split: tuple(units[i] for i in indices[split]) for split in SPLITS},
        batch_size=evaluation.batch_size,
        max_new_tokens=evaluation.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad,
        decode=tokenizer.decode,
    )


def split_indices(
    count: int, evaluation: Evaluation, seed: int, *, where: str, what: str, fix: str
) -> dict[Split, list[int]]:
    """Shuffle ``count`` units with the seed and cut them into the disjoint splits.

    The report split follows the search split and validation comes last, so adding validation
    to a search leaves its search and report items as they were.

    Raises:
        EvaluationDataError: fewer units than the splits need (``where``, ``what`` and ``fix``
        word the message).
    """
    sizes = {
        "search": evaluation.search_size,
        "report": evaluation.report_size,
        "validation": evaluation.validation_size,
    }
    need = sum(sizes.values())
    if count < need:
        named = " + ".join(f"{split}_size" for split in SPLITS if sizes[split])
        raise EvaluationDataError(where, f"has {count} {what}, fewer than {named} = {need}; {fix}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    out: dict[Split, list[int]] = {}
    start = 0
    for split in SPLITS:
        out[split] = order[start : start + sizes[split]]
        start += sizes[split]
    return out


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise EvaluationDataError(path, f"cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise EvaluationDataError(path, "is not UTF-8 text") from None


def _read_items(path: str, tokenizer: Tokenizer) -> list[Item]:
    items = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationDataError(path, f"not valid JSON ({exc.msg})", line=number) from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("prompt"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise EvaluationDataError(
                path, 'each line must be {"prompt": "...", "answer": "..."}', line=number
            )
        answer = list(tokenizer(row["answer"], add_special_tokens=False)["input_ids"])
        if not answer:
            raise EvaluationDataError(path, "the answer is empty", line=number)
        choices: tuple[list[int], ...] = ()
        correct = -1
        if "choices" in row:
            raw = row["choices"]
            if (
                not isinstance(raw, list)
                or not all(isinstance(c, str) for c in raw)
                or row["answer"] not in raw
            ):
                raise EvaluationDataError(
                    path, "`choices` must be a list of texts that includes the answer", line=number
                )
            choices = tuple(list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in raw)
            correct = raw.index(row["answer"])
        prompt = list(tokenizer(row["prompt"])["input_ids"])
        items.append(Item(prompt, answer, row["answer"], choices, correct))
    return items


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _perplexity(model: Any, blocks: Sequence[list[int]], batch_size: int) -> float:
    total_nll = 0.0
    count = 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size], device=_device(model))  # [B, T]
        logits = model(input_ids=ids).logits.float()  # [B, T, V]
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
        total_nll += float(nll.sum(dtype=torch.float64))
        count += nll.numel()
    return float(torch.exp(torch.tensor(total_nll / count, dtype=torch.float64)))


def _continuation_logprobs(
    model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad: int
) -> list[tuple[float, bool]]:
    """For each (context, continuation): its total log-likelihood and whether it is the greedy one."""
    seqs = [c + x for c, x in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):  # right padding: the real positions are unaffected
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, T, V]
    out = []
    for row, (context, continuation) in enumerate(pairs):
        first = len(context) - 1  # the position that predicts the continuation's first token
        span = logits[row, first : first + len(continuation)]  # [n, V]
        target = torch.tensor(continuation, device=span.device)
        logprob = torch.log_softmax(span, dim=-1).gather(-1, target[:, None]).sum()
        greedy = bool((span.argmax(dim=-1) == target).all())
        out.append((float(logprob), greedy))
    return out


def _loglikelihood_accuracy(model: Any, items: Sequence[Item], batch_size: int, pad: int) -> float:
    correct = 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        pairs: list[tuple[list[int], list[int]]] = []
        for item in batch:
            pairs += (
                [(item.prompt, c) for c in item.choices] if item.choices else [(item.prompt, item.answer)]
            )
        results = iter(_continuation_logprobs(model, pairs, pad))
        for item in batch:
            if item.choices:
                scores = [next(results)[0] for _ in item.choices]
                correct += int(max(range(len(scores)), key=scores.__getitem__) == item.correct_choice)
            else:
                correct += int(next(results)[1])
    return correct / len(items)


def _exact_match(
    model: Any,
    items: Sequence[Item],
    max_new: int | None,
    eos: int | None,
    pad: int,
    decode: Any,
    batch_size: int,
) -> float:
    correct = 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        limits = [max_new or len(item.answer) for item in batch]
        for item, generated in zip(
            batch, greedy_batch(model, [i.prompt for i in batch], limits, eos, pad), strict=True
        ):
            text = decode(generated, skip_special_tokens=True)
            prediction = text.strip().split("\n")[0].strip() if text.strip() else ""
            correct += int(prediction == item.answer_text.strip())
    return correct / len(items)


def _cache_keyword(model: Any) -> str:
    """The name under which ``model.forward`` takes its key/value cache.

    transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns until its removal);
    the signature says which one the installed version expects.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_batch(
    model: Any, prompts: Sequence[list[int]], limits: Sequence[int], eos: int | None, pad: int
) -> list[list[int]]:
    """Greedy continuations of several prompts at once: up to ``limits[i]`` tokens, stopping at ``eos``.

    Why batched: one prompt at a time, a search trial's evaluation was dozens of tiny forward
    passes per item. Prompts are padded on the left with an attention mask, and positions
    count only real tokens, so each row sees what it would see alone.
    """
    device = _device(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generated: list[list[int]] = [[] for _ in prompts]
    done = [limit <= 0 for limit in limits]
    cache = {_cache_keyword(model): DynamicCache(config=model.config)}
    while not all(done):
        # the cache object is filled in place, so each step passes the same one back
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
        tokens = out.logits[:, -1].argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if eos is not None and token == eos:
                done[row] = True
                continue
            generated[row].append(token)
            done[row] = len(generated[row]) >= limits[row]
        ids = tokens[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return generated
