"""Fixtures for the evolutionary search: tiny data files and search files over the tiny families."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_models import _CORPUS_WORDS, Family

WriteSearch = Callable[..., Path]


def corpus_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_CORPUS_WORDS) for _ in range(n_words))


def qa_items(n: int, seed: int) -> list[dict[str, Any]]:
    """Distinct prompt/answer items from the tokenizer's corpus (every item's prompt differs)."""
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(items) < n:
        prompt = " ".join(rng.choice(_CORPUS_WORDS) for _ in range(5))
        if prompt in seen:
            continue
        seen.add(prompt)
        answer = rng.choice(_CORPUS_WORDS)
        choices = sorted({answer, *rng.sample(_CORPUS_WORDS, 3)})
        items.append({"prompt": prompt, "answer": " " + answer, "choices": [" " + c for c in choices]})
    return items


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A text file (perplexity) and a JSONL file (exact match, log-likelihood)."""
    root = tmp_path_factory.mktemp("evolve-data")
    text = root / "eval.txt"
    text.write_text(corpus_text(1200, seed=0), encoding="utf-8")
    jsonl = root / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(item) for item in qa_items(24, seed=1)) + "\n", encoding="utf-8")
    return {"text": text, "jsonl": jsonl}


@pytest.fixture(scope="session")
def search_file_factory(eval_data: dict[str, Path]) -> Callable[..., Path]:
    """``make(folder, family, name="search.yml", **overrides)``: write a search file; returns its path."""

    def make(folder: Path, family: Family, name: str = "search.yml", **overrides: Any) -> Path:
        data: dict[str, Any] = {
            "method": "dare_ties",
            "base_model": str(family.base),
            "models": [str(p) for p in family.finetunes[:2]],
            "parameters": {"weight": {"min": 0.1, "max": 1.0}, "density": {"min": 0.3}},
            "evaluation": {
                "kind": "perplexity",
                "data": str(eval_data["text"]),
                "search_size": 6,
                "report_size": 6,
                "block_size": 24,
            },
            "budget": {"trials": 3},
            "seed": 0,
        }
        data.update(overrides)
        path = folder / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return make


@pytest.fixture
def write_search(tmp_path: Path, search_file_factory: Callable[..., Path]) -> Callable[..., Path]:
    """``write_search(family, **overrides)``: a search file in tmp_path; returns its path."""
    return functools.partial(search_file_factory, tmp_path)
