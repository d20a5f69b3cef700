"""README.md front matter -> the Hub's `cardData` and the tags it derives from it."""

from __future__ import annotations

import re
from typing import Any

import yaml

from localhub.errors import BadRequest

FRONT_MATTER_RE = re.compile(r"\A\s*---[ \t]*\r?\n(.*?\r?\n)?---[ \t]*(\r?\n|\Z)", re.DOTALL)


def parse_card(text: str) -> dict[str, Any] | None:
    """The YAML metadata block of a card, or None if it has none.

    Raises:
        BadRequest: the block is not valid YAML or not a mapping.
    """
    match = FRONT_MATTER_RE.match(text)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1) or "")
    except yaml.YAMLError as exc:
        raise BadRequest(f"Invalid YAML in README.md metadata: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadRequest("Invalid metadata in README.md: the YAML block must be a mapping.")
    return data


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def base_model_relation(card: dict[str, Any]) -> str | None:
    """The card's `base_model_relation`, or the Hub's guess: several parents make a merge."""
    parents = _as_list(card.get("base_model"))
    if not parents:
        return None
    relation = card.get("base_model_relation")
    if isinstance(relation, str) and relation in {"adapter", "merge", "quantized", "finetune"}:
        return relation
    return "merge" if len(parents) > 1 else "finetune"


def card_tags(card: dict[str, Any]) -> list[str]:
    """Tags the Hub adds from card metadata, in the Hub's spelling (``base_model:merge:org/name``)."""
    tags: list[str] = []
    tags += _as_list(card.get("library_name"))
    tags += _as_list(card.get("tags"))
    if isinstance(card.get("pipeline_tag"), str):
        tags.append(card["pipeline_tag"])
    tags += _as_list(card.get("language"))
    tags += [f"dataset:{d}" for d in _as_list(card.get("datasets"))]
    parents = _as_list(card.get("base_model"))
    relation = base_model_relation(card)
    for parent in parents:
        tags.append(f"base_model:{parent}")
    for parent in parents:
        tags.append(f"base_model:{relation}:{parent}")
    tags += [f"license:{lic}" for lic in _as_list(card.get("license"))]
    return list(dict.fromkeys(tags))
