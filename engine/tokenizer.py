"""Tokenizer files in and out, for recipes that build the output's vocabulary.

Reading happens before planning (each model's ``tokenizer.json`` through its
:class:`~engine.sources.ModelSource`, so local folders, Hub repos and LoRA bases alike), and
writing after the tensors (the output tokenizer the plan built). Neither imports
``transformers`` or ``tokenizers``: a tokenizer.json is plain JSON, and what the merge
needs from it is its tokens and ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from engine.errors import ModelNotFoundError
from engine.sources import ModelSource
from engine.vocab import TOKENIZER_JSON, VocabPlan, Vocabulary

# Files that describe the vocabulary itself: they would contradict a rebuilt tokenizer.json.
VOCABULARY_FILES = ("tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt")
CONFIG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def read_vocabulary(source: ModelSource) -> Vocabulary:
    """A model's tokenizer.json, parsed.

    Raises:
        ModelNotFoundError: the model has no tokenizer.json (a slow tokenizer only).
    """
    if TOKENIZER_JSON not in source.files():
        raise ModelNotFoundError(
            source.reference,
            "it has no tokenizer.json, which merging vocabularies needs (only fast tokenizers are supported); "
            "drop `tokenizer_source` to copy the base's tokenizer as it is",
        )
    text = source.read_file(TOKENIZER_JSON).decode("utf-8")
    return Vocabulary.from_tokenizer_json(text, f"{source.reference}/{TOKENIZER_JSON}")


def write_tokenizer(plan: VocabPlan, sources: Mapping[str, ModelSource], folder: str) -> list[str]:
    """Write the output tokenizer into ``folder``; returns the file names written.

    An unchanged tokenizer is copied whole from its model. A rebuilt one is its tokenizer.json
    with the donor's tokenizer_config.json (its ``added_tokens_decoder``, if any, made to agree)
    and special-token map; the donor's vocabulary files (sentencepiece model, vocab/merges)
    are left out, since they would describe another vocabulary.
    """
    donor = sources[plan.donor]
    available = set(donor.files())
    written = []
    names = CONFIG_FILES if plan.changed else (TOKENIZER_JSON, *CONFIG_FILES, *VOCABULARY_FILES)
    for name in names:
        if name in available:
            data = donor.read_file(name)
            if plan.changed and name == "tokenizer_config.json":
                data = _updated_tokenizer_config(data, plan)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            written.append(name)
    if plan.changed:
        with open(os.path.join(folder, TOKENIZER_JSON), "w", encoding="utf-8") as f:
            f.write(plan.document)
        written.append(TOKENIZER_JSON)
    return written


def _updated_tokenizer_config(data: bytes, plan: VocabPlan) -> bytes:
    config = json.loads(data)
    if not isinstance(config, dict) or not isinstance(config.get("added_tokens_decoder"), dict):
        return data
    doc = json.loads(plan.document)
    config["added_tokens_decoder"] = {
        str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in doc.get("added_tokens") or []
    }
    return (json.dumps(config, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
