"""Models whose vocabularies differ: the output tokenizer and every embedding row, by token.

Two fine-tunes of the tiny Llama grow their vocabularies as people do (``add_tokens``,
``resize_token_embeddings``): one adds two plain tokens and a special one, the other shares
one of those, adds its own, and pads its embeddings to a multiple of 16. Merges with
``tokenizer_source`` base / union / a model, and mergekit's ``tokenizer:`` block, are
compared with mergekit: rows by token (mergekit's union numbers new tokens in hash order),
every other tensor as usual.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import load_tensors, read_json, recipe_yaml, run_mergekit
from tiny_models import VOCAB_SIZE, Family

from engine import (
    IncompatibleModelsError,
    ModelNotFoundError,
    RecipeError,
    load_recipe,
    plan_merge,
    run_merge,
)
from engine.vocab import TokenRule, VocabPlan, align_rows

BF16_RTOL = 2.0**-7
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def grow_vocabulary(
    src: Path, dst: Path, tokens: list[str], special: list[str], pad: int | None, seed: int
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.add_tokens(tokens)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special})
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            table[VOCAB_SIZE:] = (0.1 * torch.randn(table[VOCAB_SIZE:].shape, generator=gen)).to(table.dtype)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory, llama_family: Family) -> tuple[Path, Path, Path]:
    """(base, x, y): x adds '<tool>', 'hello' and special '<think>' (99 rows); y adds '<tool>', 'world', padded to 112 rows."""
    root = tmp_path_factory.mktemp("grown")
    x = grow_vocabulary(llama_family.finetunes[0], root / "x", ["<tool>", "hello"], ["<think>"], None, 7)
    y = grow_vocabulary(llama_family.finetunes[1], root / "y", ["<tool>", "world"], [], 16, 8)
    return llama_family.base, x, y


def recipe_for(method: str, models: tuple[Path, Path, Path], **tokenizer: Any) -> dict[str, Any]:
    # unequal weights: with equal ones, TIES's sign election on a token both fine-tunes added
    # (the base's row is their mean, so their deltas are opposite) is a coin toss in rounding
    weights = (0.2, 0.5, 0.3)
    recipe: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(models[0]),
        "models": [
            {"model": str(m), "parameters": {"weight": w, **({"density": 1.0} if method == "ties" else {})}}
            for m, w in zip(models, weights, strict=True)
        ],
    }
    recipe.update(tokenizer)
    return recipe


def vocabulary(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(folder).get_vocab())


def compare_with_mergekit(recipe: dict[str, Any], tmp_path: Path, record: Any, label: str) -> Path:
    mk_dir = run_mergekit(recipe, tmp_path / "mergekit")
    ours_dir = tmp_path / "ours"
    run_merge(load_recipe(recipe_yaml(recipe)), ours_dir)
    ours_vocab, mk_vocab = vocabulary(ours_dir), vocabulary(mk_dir)
    assert set(ours_vocab) == set(mk_vocab)
    assert (
        read_json(ours_dir / "config.json")["vocab_size"] == read_json(mk_dir / "config.json")["vocab_size"]
    )
    ours, mk = load_tensors(ours_dir), load_tensors(mk_dir)
    assert sorted(ours) == sorted(mk)
    tokens = sorted(mk_vocab, key=mk_vocab.__getitem__)
    for name in sorted(mk):
        a, b = ours[name].float(), mk[name].float()
        assert a.shape == b.shape, name
        if name in VOCAB_TENSORS:
            # token rows in mergekit's order, then the padding rows
            order = [ours_vocab[t] for t in tokens] + list(range(len(tokens), a.shape[0]))
            a = a[order]
        rel = ((a - b).norm() / b.norm()).item()
        record(f"vocab {label} mergebot~mergekit", name, rel)
        if recipe["merge_method"] == "linear":
            torch.testing.assert_close(a, b, rtol=BF16_RTOL, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert rel <= 5e-3, f"{name}: relative L2 {rel:.2e}"  # TIES in bf16 (mergekit) vs float32
    return ours_dir


@pytest.mark.parametrize(
    ("method", "source"),
    [("linear", "base"), ("linear", "union"), ("ties", "union"), ("ties", "x"), ("linear", "y")],
)
def test_tokenizer_source_matches_mergekit(
    grown: tuple[Path, Path, Path], tmp_path: Path, parity_report: Any, method: str, source: str
) -> None:
    named = {"x": str(grown[1]), "y": str(grown[2])}
    recipe = recipe_for(method, grown, tokenizer_source=named.get(source, source))
    ours = compare_with_mergekit(recipe, tmp_path, parity_report, source)
    expected = {
        "base": set(),
        "union": {"<tool>", "hello", "<think>", "world"},
        "x": {"<tool>", "hello", "<think>"},
        "y": {"<tool>", "world"},
    }[source]
    got = vocabulary(ours)
    assert set(got) - set(vocabulary(grown[0])) == expected
    if source != "union":  # a single tokenizer keeps its ids; mergekit's union ids are in hash order
        assert got == vocabulary(grown[{"base": 0, "x": 1, "y": 2}[source]])


def test_output_loads_in_transformers_with_its_vocabulary(
    grown: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_merge(
        load_recipe(recipe_yaml(recipe_for("linear", grown, tokenizer_source="union"))), tmp_path / "o"
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert len(tokenizer) == model.config.vocab_size == VOCAB_SIZE + 4
    ids = tokenizer("<tool> the cat<think>", return_tensors="pt")["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<tool>") in ids[0].tolist()
    assert tokenizer.convert_tokens_to_ids("<think>") in ids[0].tolist()
    logits = model(ids).logits
    assert logits.shape[-1] == VOCAB_SIZE + 4 and torch.isfinite(logits).all()
    # a token only 'x' has: the merged row is x's row (the others take it too, weights normalized)
    merged = load_tensors(tmp_path / "o")["model.embed_tokens.weight"]
    x_rows = load_tensors(grown[1])["model.embed_tokens.weight"]
    hello = tokenizer.convert_tokens_to_ids("hello")
    torch.testing.assert_close(
        merged[hello].float(), x_rows[VOCAB_SIZE + 1].float(), rtol=BF16_RTOL, atol=1e-5
    )
    assert any("tokens added to the base's vocabulary (4)" in note for note in result.notes)


def test_pad_to_multiple_and_token_rules_match_mergekit(
    grown: tuple[Path, Path, Path], tmp_path: Path, parity_report: Any
) -> None:
    block = {
        "source": "union",
        "pad_to_multiple_of": 16,
        "tokens": {
            "<extra>": {"source": {"kind": "model_token", "model": str(grown[0]), "token": "Ġcat"}},
            "<tool>": {"source": {"kind": "zero"}, "force": True},
            "hello": {"source": str(grown[1]), "force": True},
        },
    }
    ours_dir = compare_with_mergekit(
        recipe_for("linear", grown, tokenizer=block), tmp_path, parity_report, "pad"
    )
    assert read_json(ours_dir / "config.json")["vocab_size"] == 112  # 101 tokens, padded
    vocab = vocabulary(ours_dir)
    rows = load_tensors(ours_dir)["model.embed_tokens.weight"].float()
    base_rows = load_tensors(grown[0])["model.embed_tokens.weight"].float()
    assert torch.equal(rows[vocab["<tool>"]], torch.zeros(rows.shape[1]))
    torch.testing.assert_close(rows[vocab["<extra>"]], base_rows[vocab["Ġcat"]], rtol=BF16_RTOL, atol=1e-5)


def test_differing_vocabularies_without_tokenizer_source_say_how(
    grown: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(IncompatibleModelsError, match="set `tokenizer_source`"):
        plan_merge(load_recipe(recipe_yaml(recipe_for("linear", grown))))
    with pytest.raises(RecipeError, match="not `base`, `union` or one of the recipe's models"):
        load_recipe(recipe_yaml(recipe_for("linear", grown, tokenizer_source="nobody/else")))
    slow = tmp_path / "slow-tokenizer-only"
    shutil.copytree(grown[2], slow)
    (slow / "tokenizer.json").unlink()
    mixed = recipe_for("linear", (grown[0], grown[1], slow), tokenizer_source="union")
    with pytest.raises(ModelNotFoundError, match=r"slow-tokenizer-only.*no tokenizer\.json"):
        plan_merge(load_recipe(recipe_yaml(mixed)))
    with pytest.raises(RecipeError, match="not both"):
        load_recipe(
            recipe_yaml(recipe_for("linear", grown, tokenizer_source="base", tokenizer={"source": "base"}))
        )


def test_cli_prints_the_tokens_added(
    grown: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(recipe_yaml(recipe_for("linear", grown, tokenizer_source="union")))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "note: tokens added to the base's vocabulary (4): '<tool>', 'hello', '<think>', 'world'" in out


def test_rows_by_hand() -> None:
    """Fill rules on 1-wide rows: base row, mean of holders, sole holder, zero, forced rule, padding."""
    plan = VocabPlan(
        source="union",
        tokens=("a", "b", "c", "d", "e"),
        size=8,
        rows={"base": (0, 1, -1, -1, -1), "x": (0, -1, 1, 2, -1), "y": (1, 0, 2, -1, -1)},
        rules={4: TokenRule("model_row", model="x", row=0, force=True)},
        document="{}",
        donor="base",
        changed=True,
    )
    base = torch.tensor([[1.0], [2.0]])
    x = torch.tensor([[10.0], [20.0], [30.0]])
    y = torch.tensor([[100.0], [200.0], [300.0]])
    out = align_rows(plan, ["base", "x", "y"], [base, x, y], "base")
    # a: all have it. b: x lacks it, base has it -> base's row. c: base lacks, x and y have -> mean.
    # d: only x -> x's row. e: forced to x's row 0 everywhere. Then 3 padding rows: the mean of 5.
    want_base = [1.0, 2.0, (20 + 300) / 2, 30.0, 10.0]
    want_x = [10.0, 2.0, 20.0, 30.0, 10.0]
    want_y = [200.0, 100.0, 300.0, 30.0, 10.0]
    for got, want in zip(out, (want_base, want_x, want_y), strict=True):
        padded = want + [sum(want) / 5] * 3
        assert got.squeeze(1).tolist() == pytest.approx(padded)
    without_base = align_rows(plan, ["x", "y"], [x, y], None)
    assert without_base[0].squeeze(1).tolist()[1] == 100.0  # b: only y has it


def test_vocabulary_json_edits_are_pure() -> None:
    """A union of two tokenizer.json documents, written without transformers or tokenizers."""
    from engine.vocab import Vocabulary, build_vocab_plan

    def doc(vocab: dict[str, int], added: list[tuple[int, str, bool]]) -> Vocabulary:
        entries = [
            {
                "id": i,
                "content": c,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": s,
            }
            for i, c, s in added
        ]
        text = json.dumps(
            {"model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"]]}, "added_tokens": entries}
        )
        return Vocabulary.from_tokenizer_json(text)

    base = doc({"<s>": 0, "a": 1, "b": 2, "ab": 3, "junk": 4}, [(0, "<s>", True)])
    other = doc({"<s>": 0, "a": 1, "c": 2}, [(0, "<s>", True), (3, "<im_end>", True)])
    plan = build_vocab_plan(
        "union", ["base", "other"], "base", {"base": base, "other": other}, {"base": 4, "other": 4}
    )
    assert plan.tokens == ("<s>", "a", "b", "ab", "c", "<im_end>")  # 'junk' is past base's 4 rows
    assert plan.rows["other"] == (0, 1, -1, -1, 2, 3)
    added = json.loads(plan.document)["added_tokens"]
    assert [(e["id"], e["content"], e["special"], e["normalized"]) for e in added] == [
        (0, "<s>", True, False),
        (4, "c", False, True),
        (5, "<im_end>", True, False),
    ]
