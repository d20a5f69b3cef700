"""Merging models whose vocabularies differ: the output vocabulary and each model's rows in it.

Pure functions and frozen values, no I/O: the planner gets every model's tokenizer as a
:class:`Vocabulary` (read beforehand by :mod:`engine.tokenizer`) and builds a
:class:`VocabPlan`; the runner calls :func:`align_rows` on the inputs of each tensor with a
vocabulary axis (input embeddings, output heads) before the merge method sees them.

What mergekit 0.1.5 does, and so what this does (``mergekit/tokenizer/build.py``, ``embed.py``):

- A model's usable vocabulary is its tokenizer's tokens with an id below its config's
  ``vocab_size`` (the rows a padded embedding has beyond the tokenizer are not tokens).
- The output tokenizer is the base's (``base``: the recipe's ``base_model``, else its first
  model), a named model's (``<model>``), or the ``union``: the base's, then every other
  model's tokens the base lacks, appended as added tokens (plain tokens first, then the
  models' own added tokens with their flags). mergekit appends the plain tokens in hash
  order; here they come in each model's id order, so ids are reproducible. Tokens named in
  the ``tokenizer.tokens`` block are appended last if missing.
- Every model's rows are permuted to the output ids. Where a model lacks a token, its row is:
  the row of the token's ``tokens:`` rule if there is one (``zero``; a model's row of the same
  token; ``kind: model_token``: a model's row of another token or id); else the base's row if
  the base is one of the tensor's inputs and has the token; else the mean of the rows of the
  inputs that have it (which is that model's row when only one has it); zero if none has it.
  ``force: true`` uses the rule's row in every model, even those that have the token.
- The merge method then runs unchanged over the aligned inputs, each model with its own
  weight: a model lacking a token votes with the filled-in row (so for ``linear`` a token
  only one model knows comes out as that model's row, when the weights are normalized).
- ``pad_to_multiple_of`` pads the rows to a multiple; each model's padding rows are the mean
  of its aligned rows (mergekit's choice), and the output config's ``vocab_size`` is the
  padded size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from engine.architecture import TIED_HEADS, is_pre_weight
from engine.errors import IncompatibleModelsError, RecipeError

TOKENIZER_JSON = "tokenizer.json"
_NOT_VOCABULARY = ("position", "wpe", "token_type", "patch", "vision", "image")


@dataclass(frozen=True)
class Vocabulary:
    """A model's tokenizer as the merge sees it: its tokenizer.json and the tokens it defines."""

    document: str  # tokenizer.json text
    tokens: Mapping[str, int]  # every token (model vocabulary and added tokens) -> id
    added: Mapping[str, Mapping[str, Any]]  # tokenizer.json's added-token entries, by content

    @classmethod
    def from_tokenizer_json(cls, text: str, where: str = TOKENIZER_JSON) -> Vocabulary:
        """Parse a tokenizer.json (``tokenizers``' format) without the ``tokenizers`` package.

        Raises:
            IncompatibleModelsError: the file is not a tokenizer.json this engine can read.
        """
        try:
            doc = json.loads(text)
            tokens = _model_vocab(doc["model"])
            added = {str(e["content"]): dict(e) for e in doc.get("added_tokens") or []}
            for content, entry in added.items():
                tokens[content] = int(entry["id"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IncompatibleModelsError(
                f"{where} is not a tokenizer.json this engine can read ({exc})"
            ) from None
        return cls(document=text, tokens=tokens, added=added)


def _model_vocab(model: Mapping[str, Any]) -> dict[str, int]:
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return {str(k): int(v) for k, v in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids by position
        return {str(item[0]): i for i, item in enumerate(vocab)}
    raise TypeError(f"tokenizer model of type {model.get('type')!r} has no vocabulary")


@dataclass(frozen=True)
class TokenRule:
    """A ``tokenizer.tokens`` entry: where a token's row comes from."""

    kind: Literal["zero", "model", "model_row"]
    model: str | None = None
    row: int | None = None  # for ``model_row``: the row in that model's own embedding
    force: bool = False


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary and, for every model, which of its rows lands at each output id."""

    source: str  # base | union | a model
    tokens: tuple[str, ...]  # output tokens, by id
    size: int  # output rows (tokens, padded to the multiple)
    rows: Mapping[str, tuple[int, ...]]  # model -> its row for each output id, -1 if it lacks the token
    rules: Mapping[int, TokenRule]  # output id -> rule from the `tokenizer.tokens` block
    document: str  # the output tokenizer.json
    donor: str  # whose other tokenizer files (tokenizer_config.json, ...) go with it
    changed: bool  # False when the output tokenizer is the donor's, unchanged
    added: tuple[str, ...] = field(default=())  # tokens of the output the base's tokenizer lacks

    def missing(self, model: str) -> tuple[str, ...]:
        """The output tokens ``model`` has no row for."""
        return tuple(tok for tok, row in zip(self.tokens, self.rows[model], strict=True) if row < 0)


def vocabulary_rows(config: Mapping[str, Any], vocabulary: Vocabulary | None) -> int | None:
    """A model's embedding rows as its config states them (``vocab_size``), else its token count."""
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("vocab_size"), int):
            return int(cfg["vocab_size"])
    return len(vocabulary.tokens) if vocabulary is not None else None


def has_vocabulary_axis(name: str) -> bool:
    """Input embeddings and output heads (weights and biases) are indexed by token on axis 0."""
    if any(hint in name for hint in _NOT_VOCABULARY):
        return False
    head = name.removesuffix(".bias") + ".weight" if name.endswith(".bias") else name
    return head in TIED_HEADS or is_pre_weight(name)


def build_vocab_plan(
    source: str,
    models: Sequence[str],
    base: str,
    vocabularies: Mapping[str, Vocabulary],
    limits: Mapping[str, int],
    *,
    extra_tokens: Mapping[str, TokenRule] | None = None,
    pad_to_multiple_of: int | None = None,
) -> VocabPlan:
    """Build the output vocabulary and every model's permutation into it.

    Args:
        source: ``base``, ``union`` or one of ``models``.
        models: every model of the recipe, in recipe order.
        base: the model whose tokenizer ``base`` and ``union`` start from.
        vocabularies: each model's tokenizer.
        limits: each model's embedding rows (config ``vocab_size``): tokens at or past it are unused.
        extra_tokens: the ``tokenizer.tokens`` block: tokens to add if missing, and their rules.
        pad_to_multiple_of: round the output rows up to a multiple of this.

    Raises:
        IncompatibleModelsError: a tokenizer cannot be stripped or extended as needed.
        RecipeError: a token rule names a token a model does not have.
    """
    usable = {m: {t: i for t, i in vocabularies[m].tokens.items() if i < limits[m]} for m in models}
    if source == "union":
        doc = _union(base, models, vocabularies, usable, _stripped(vocabularies[base], limits[base], base))
        donor = base
    elif source == "base":
        doc, donor = _stripped(vocabularies[base], limits[base], base), base
    else:
        doc, donor = json.loads(vocabularies[source].document), source
    rules = dict(extra_tokens or {})
    appender = _Appender(doc)
    for token in rules:
        appender.add(token, None)
    document = json.dumps(doc, ensure_ascii=False, indent=2)
    out = Vocabulary.from_tokenizer_json(document, f"the output {TOKENIZER_JSON}")
    ids = sorted(out.tokens.values())
    if ids != list(range(len(ids))):
        raise IncompatibleModelsError(
            f"The output tokenizer's ids are not 0..{len(ids) - 1} without gaps, so they cannot index embedding "
            f"rows (tokenizer from '{donor}'). Use another `tokenizer_source`.",
            models=[donor],
            field="tokenizer",
        )
    tokens = tuple(sorted(out.tokens, key=out.tokens.__getitem__))
    size = len(tokens)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    rows = {m: tuple(usable[m].get(tok, -1) for tok in tokens) for m in models}
    resolved: dict[int, TokenRule] = {}
    for token, rule in rules.items():
        if rule.kind == "model" and rule.model is not None and token not in usable[rule.model]:
            raise RecipeError.single(
                f"tokenizer.tokens.{token}.source",
                f"'{rule.model}' has no token {token!r} to take the row of",
            )
        resolved[out.tokens[token]] = rule
    unchanged = source not in ("base", "union") or document == _canonical(vocabularies[donor].document)
    base_tokens = set(usable[base])
    return VocabPlan(
        source=source,
        tokens=tokens,
        size=size,
        rows=rows,
        rules=resolved,
        document=vocabularies[donor].document if unchanged else document,
        donor=donor,
        changed=not unchanged,
        added=tuple(t for t in tokens if t not in base_tokens),
    )


def _canonical(text: str) -> str:
    return json.dumps(json.loads(text), ensure_ascii=False, indent=2)


def _doc_tokens(doc: Mapping[str, Any]) -> dict[str, int]:
    tokens = _model_vocab(doc["model"])
    for entry in doc.get("added_tokens") or []:
        tokens[str(entry["content"])] = int(entry["id"])
    return tokens


def _stripped(vocabulary: Vocabulary, limit: int, model: str) -> dict[str, Any]:
    """The tokenizer without the tokens at or past ``limit`` (mergekit's "stripped" base tokenizer)."""
    doc: dict[str, Any] = json.loads(vocabulary.document)
    unused = {t for t, i in vocabulary.tokens.items() if i >= limit}
    if not unused:
        return doc
    bpe = doc["model"]
    if bpe.get("type") != "BPE":
        raise IncompatibleModelsError(
            f"The tokenizer of '{model}' has {len(unused)} tokens past its {limit} embedding rows, and only "
            f"BPE tokenizers can be trimmed to fit (this one is {bpe.get('type')}).",
            models=[model],
            field="tokenizer",
        )
    doc["added_tokens"] = [e for e in doc.get("added_tokens") or [] if int(e["id"]) < limit]
    bpe["vocab"] = {t: i for t, i in bpe["vocab"].items() if i < limit}

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    bpe["merges"] = [m for m in bpe.get("merges") or [] if keep(m)]
    return doc


def _union(
    base: str,
    models: Sequence[str],
    vocabularies: Mapping[str, Vocabulary],
    usable: Mapping[str, Mapping[str, int]],
    base_doc: dict[str, Any],
) -> dict[str, Any]:
    builder = _Appender(base_doc)
    order = [base, *(m for m in models if m != base)]
    added: dict[str, Mapping[str, Any]] = {}
    for model in order:
        for content, entry in sorted(vocabularies[model].added.items(), key=lambda kv: int(kv[1]["id"])):
            if usable[model].get(content) == int(entry["id"]):
                added.setdefault(content, entry)
    for model in order:
        for token in sorted(usable[model], key=usable[model].__getitem__):
            if token not in vocabularies[model].added and token not in added:
                builder.add(token, None)
    for token, entry in added.items():
        builder.add(token, entry)
    return base_doc


class _Appender:
    """Appends added tokens to a tokenizer.json document, each with the next free id."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.present = _doc_tokens(doc)
        self.next_id = max(self.present.values(), default=-1) + 1

    def add(self, token: str, entry: Mapping[str, Any] | None) -> None:
        """Add ``token`` unless present: a plain token, or with the flags of ``entry``."""
        if token in self.present:
            return
        flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
        if entry is not None:
            flags.update({k: entry[k] for k in flags if k in entry})
        self.doc.setdefault("added_tokens", []).append({"id": self.next_id, "content": token, **flags})
        self.present[token] = self.next_id
        self.next_id += 1


# --- rows ---------------------------------------------------------------------------------------


def align_rows(
    plan: VocabPlan, models: Sequence[str], tensors: Sequence[torch.Tensor], base: str | None
) -> list[torch.Tensor]:
    """Permute each input's rows (axis 0) to the output vocabulary, filling the rows it lacks.

    Args:
        models: the model of each input, in order.
        tensors: the inputs, each ``[rows_of_that_model, *rest]`` with the same ``rest``.
        base: the base model if it is one of the inputs.

    Returns:
        The inputs, each ``[plan.size, *rest]``, in the dtype and on the device they came in.
    """
    n = len(plan.tokens)
    rest = tensors[0].shape[1:]
    expand = (-1,) + (1,) * len(rest)
    present, gathered = [], []
    for model, tensor in zip(models, tensors, strict=True):
        index = torch.tensor(plan.rows[model], dtype=torch.long, device=tensor.device)  # [n]
        has = (index >= 0) & (index < tensor.shape[0])
        rows = tensor[index.clamp(0, max(tensor.shape[0] - 1, 0))]  # [n, *rest]
        gathered.append(rows * has.view(expand).to(rows.dtype))
        present.append(has)
    count = torch.stack(present).sum(0)  # [n]
    fill = torch.stack(gathered).sum(0) / count.clamp(min=1).view(expand).to(tensors[0].dtype)
    if base is not None and base in models:
        b = models.index(base)
        fill = torch.where(present[b].view(expand), gathered[b], fill)
    forced = torch.zeros(n, dtype=torch.bool, device=tensors[0].device)
    for token_id, rule in plan.rules.items():
        fill[token_id] = _rule_row(plan, rule, token_id, models, tensors)
        forced[token_id] = rule.force
    out = []
    for has, rows in zip(present, gathered, strict=True):
        aligned = torch.where((has & ~forced).view(expand), rows, fill)  # [n, *rest]
        if plan.size > n:
            padding = aligned.mean(0, keepdim=True).expand(plan.size - n, *rest)
            aligned = torch.cat([aligned, padding])
        out.append(aligned)
    return out


def _rule_row(
    plan: VocabPlan, rule: TokenRule, token_id: int, models: Sequence[str], tensors: Sequence[torch.Tensor]
) -> torch.Tensor:
    if rule.kind == "zero" or rule.model is None:
        return tensors[0].new_zeros(tensors[0].shape[1:])
    if rule.model not in models:
        raise RecipeError.single(
            f"tokenizer.tokens.{plan.tokens[token_id]}.source",
            f"takes its row from '{rule.model}', which is not an input of every embedding tensor",
        )
    tensor = tensors[models.index(rule.model)]
    row = rule.row if rule.kind == "model_row" else plan.rows[rule.model][token_id]
    if row is None or not 0 <= row < tensor.shape[0]:
        raise RecipeError.single(
            f"tokenizer.tokens.{plan.tokens[token_id]}.source",
            f"row {row} is outside the {tensor.shape[0]} rows of '{rule.model}'",
        )
    return tensor[row]
