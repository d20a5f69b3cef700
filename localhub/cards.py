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


# The Hub's licence identifiers (hub-docs, repositories-licenses.md): what `license:` may hold.
HUB_LICENSES = frozenset(
    [
        "apache-2.0",
        "mit",
        "openrail",
        "bigscience-openrail-m",
        "creativeml-openrail-m",
        "bigscience-bloom-rail-1.0",
        "bigcode-openrail-m",
        "afl-3.0",
        "artistic-2.0",
        "bsl-1.0",
        "bsd",
        "bsd-2-clause",
        "bsd-3-clause",
        "bsd-3-clause-clear",
        "c-uda",
        "cc",
        "cc0-1.0",
        "cc-by-2.0",
        "cc-by-2.5",
        "cc-by-3.0",
        "cc-by-4.0",
        "cc-by-sa-3.0",
        "cc-by-sa-4.0",
        "cc-by-nc-2.0",
        "cc-by-nc-3.0",
        "cc-by-nc-4.0",
        "cc-by-nd-4.0",
        "cc-by-nc-nd-3.0",
        "cc-by-nc-nd-4.0",
        "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0",
        "cc-by-nc-sa-4.0",
        "cdla-sharing-1.0",
        "cdla-permissive-1.0",
        "cdla-permissive-2.0",
        "wtfpl",
        "ecl-2.0",
        "epl-1.0",
        "epl-2.0",
        "etalab-2.0",
        "eupl-1.1",
        "eupl-1.2",
        "agpl-3.0",
        "gfdl",
        "gpl",
        "gpl-2.0",
        "gpl-3.0",
        "lgpl",
        "lgpl-2.1",
        "lgpl-3.0",
        "isc",
        "h-research",
        "intel-research",
        "lppl-1.3c",
        "ms-pl",
        "apple-ascl",
        "apple-amlr",
        "mpl-2.0",
        "odc-by",
        "odbl",
        "openrail++",
        "osl-3.0",
        "postgresql",
        "ofl-1.1",
        "ncsa",
        "unlicense",
        "zlib",
        "pddl",
        "lgpl-lr",
        "deepfloyd-if-license",
        "fair-noncommercial-research-license",
        "llama2",
        "llama3",
        "llama3.1",
        "llama3.2",
        "llama3.3",
        "llama4",
        "gemma",
        "unknown",
        "other",
    ]
)
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def metadata_problems(card: dict[str, Any]) -> list[str]:
    """What the Hub refuses in a card's metadata: licence ids, `base_model_relation`, `other` terms."""
    problems: list[str] = []
    licenses = _as_list(card.get("license"))
    for lic in licenses:
        if lic not in HUB_LICENSES:
            problems.append(
                f'"license" must be one of the Hub\'s licence identifiers (got {lic!r}); '
                "use `other` with `license_name` and `license_link` for any other licence."
            )
    if "other" in licenses:
        for key in ("license_name", "license_link"):
            if not isinstance(card.get(key), str) or not card[key].strip():
                problems.append(f'"{key}" is required when "license" is "other".')
    relation = card.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        problems.append(
            f'"base_model_relation" must be one of {list(BASE_MODEL_RELATIONS)} (got {relation!r}).'
        )
    return problems


def check_card(text: str) -> dict[str, Any] | None:
    """Parse a README.md and refuse metadata the Hub refuses (as a commit of it would be).

    Raises:
        BadRequest: the YAML block is invalid, or its metadata breaks one of the Hub's rules.
    """
    card = parse_card(text)
    problems = metadata_problems(card) if card else []
    if problems:
        raise BadRequest("Invalid metadata in README.md.\n" + "\n".join(f"- {p}" for p in problems))
    return card


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
    if isinstance(relation, str) and relation in BASE_MODEL_RELATIONS:
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
