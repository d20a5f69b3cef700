"""Evaluations: hand-checked scores, deterministic disjoint splits, clear data errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import Family
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.evolve import EvaluationDataError
from engine.evolve.evaluate import load_evaluator
from engine.evolve.spec import Evaluation


@pytest.fixture(scope="module")
def model_and_tokenizer(llama_family: Family) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(llama_family.base, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(llama_family.base)


def evaluation(path: Path, kind: str, search: int, report: int, **extra: Any) -> Evaluation:
    return Evaluation(kind=kind, data=str(path), search_size=search, report_size=report, **extra)  # type: ignore[arg-type]


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_splits_are_disjoint_and_fixed_by_the_seed(
    eval_data: dict[str, Path], model_and_tokenizer: Any
) -> None:
    _, tok = model_and_tokenizer
    ev = evaluation(eval_data["jsonl"], "exact_match", 10, 8)
    a = load_evaluator(ev, tok, seed=0)
    b = load_evaluator(ev, tok, seed=0)
    c = load_evaluator(ev, tok, seed=1)
    prompts = {split: [tuple(i.prompt) for i in a.splits[split]] for split in ("search", "report")}
    assert len(prompts["search"]) == 10 and len(prompts["report"]) == 8
    assert not set(prompts["search"]) & set(prompts["report"])
    assert a.splits == b.splits and a.splits != c.splits

    text = load_evaluator(evaluation(eval_data["text"], "perplexity", 5, 5, block_size=16), tok, seed=0)
    assert all(len(block) == 16 for block in text.splits["search"] + text.splits["report"])
    assert not set(map(tuple, text.splits["search"])) & set(map(tuple, text.splits["report"]))


def test_a_validation_split_comes_after_the_others_and_leaves_them_as_they_were(
    eval_data: dict[str, Path], model_and_tokenizer: Any
) -> None:
    _, tok = model_and_tokenizer
    plain = load_evaluator(evaluation(eval_data["jsonl"], "exact_match", 10, 8), tok, seed=0)
    three = load_evaluator(
        evaluation(eval_data["jsonl"], "exact_match", 10, 8, validation_size=6), tok, seed=0
    )
    assert (
        three.splits["search"] == plain.splits["search"] and three.splits["report"] == plain.splits["report"]
    )
    prompts = {
        split: {tuple(i.prompt) for i in three.splits[split]} for split in ("search", "report", "validation")
    }
    assert len(prompts["validation"]) == 6 and not prompts["validation"] & (
        prompts["search"] | prompts["report"]
    )
    assert plain.splits["validation"] == ()
    with pytest.raises(
        EvaluationDataError,
        match=r"has 24 items, fewer than search_size \+ report_size \+ validation_size = 25",
    ):
        load_evaluator(evaluation(eval_data["jsonl"], "exact_match", 10, 8, validation_size=7), tok, seed=0)


def test_perplexity_is_exp_of_the_mean_token_loss(
    eval_data: dict[str, Path], model_and_tokenizer: Any
) -> None:
    model, tok = model_and_tokenizer
    ev = load_evaluator(
        evaluation(eval_data["text"], "perplexity", 3, 1, block_size=20, batch_size=2), tok, seed=0
    )
    blocks = torch.tensor(ev.splits["search"])
    with torch.inference_mode():
        loss = model(input_ids=blocks, labels=blocks).loss  # mean over the 3 x 19 predicted tokens
    assert ev.score(model, "search") == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_exact_match_and_loglikelihood_count_the_greedy_answers(
    model_and_tokenizer: Any, tmp_path: Path
) -> None:
    model, tok = model_and_tokenizer
    words = [
        "the cat sat on",
        "a dog ran to the",
        "big red model",
        "merge the base",
        "blue slerp layer",
        "small green tensor",
        "ties dare linear",
        "pass through slice",
    ]
    rows = []
    for i, prompt in enumerate(words):
        answer_ids = greedy(model, tok(prompt)["input_ids"], 1)
        if i % 2:  # every other item gets a wrong answer
            answer_ids = [answer_ids[0] + 1 if answer_ids[0] < 95 else 40]
        rows.append({"prompt": prompt, "answer": tok.decode(answer_ids)})
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    for kind in ("exact_match", "loglikelihood"):
        ev = load_evaluator(evaluation(path, kind, 4, 4, batch_size=3), tok, seed=0)
        expected = 0
        for item in ev.splits["search"] + ev.splits["report"]:
            expected += (
                tok.decode(greedy(model, list(item.prompt), len(item.answer))).strip()
                == item.answer_text.strip()
            )
        assert expected == 4
        assert ev.score(model, "search") * 4 + ev.score(model, "report") * 4 == expected, kind


def test_choices_pick_the_most_likely_answer(model_and_tokenizer: Any, tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    prompt = "the cat sat on"
    ids = tok(prompt)["input_ids"]
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
    candidates = [t for t in logprobs.argsort(descending=True).tolist() if t >= 4][:3]  # no special tokens
    texts = [tok.decode([t]) for t in candidates]
    rows = [
        {"prompt": prompt, "answer": texts[0], "choices": texts},  # the most likely: correct
        {"prompt": prompt, "answer": texts[2], "choices": texts},  # not the most likely: wrong
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    ev = load_evaluator(evaluation(path, "loglikelihood", 1, 1), tok, seed=0)
    both = ev.score(model, "search") + ev.score(model, "report")
    assert both == 1.0


def test_bad_data_files_say_what_and_where(model_and_tokenizer: Any, tmp_path: Path) -> None:
    _, tok = model_and_tokenizer
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(EvaluationDataError, match=r"bad.jsonl \(line 2\): each line must be"):
        load_evaluator(evaluation(bad, "exact_match", 1, 1), tok, seed=0)
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(EvaluationDataError, match=r"\(line 2\): not valid JSON"):
        load_evaluator(evaluation(bad, "exact_match", 1, 1), tok, seed=0)
    small = tmp_path / "small.txt"
    small.write_text("the cat sat on the mat", encoding="utf-8")
    with pytest.raises(EvaluationDataError, match="fewer than search_size \\+ report_size = 4"):
        load_evaluator(evaluation(small, "perplexity", 2, 2, block_size=8), tok, seed=0)


def test_batched_greedy_decoding_gives_each_prompt_its_own_continuation(model_and_tokenizer: Any) -> None:
    """Left padding, the mask and the positions leave every row as it would be alone; eos stops a row."""
    from engine.evolve.evaluate import greedy_batch

    model, tok = model_and_tokenizer
    prompts = [
        tok(text)["input_ids"] for text in ("the cat", "a dog ran to the big red", "merge", "blue slerp")
    ]
    limits = [5, 3, 6, 0]
    alone = [greedy(model, prompt, limit) for prompt, limit in zip(prompts, limits, strict=True)]
    with torch.inference_mode():
        assert greedy_batch(model, prompts, limits, None, pad=0) == alone
        stop = alone[0][2]  # a token the first row produces third: it ends that row there
        stopped = greedy_batch(model, prompts, limits, stop, pad=0)
    assert stopped[0] == alone[0][: alone[0].index(stop)]
    for got, full in zip(stopped[1:], alone[1:], strict=True):
        assert got == (full[: full.index(stop)] if stop in full else full)
