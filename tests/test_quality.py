"""engine.quality: the figures (perplexity, degenerate generations), the verdict, and `merge --eval`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import MergeOptions, run_merge
from engine.cli import EXIT_QUALITY, main
from engine.config import validate_recipe
from engine.quality import (
    PPL_FLOOR,
    PPL_RATIO,
    Generation,
    ModelQuality,
    QualityOptions,
    check_quality,
    degenerate_problem,
    judge,
    quality_text,
)
from mergebot.demo_models import build_demo_models

SMALL = QualityOptions(max_tokens=512, max_new_tokens=16)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_demo_models(str(tmp_path_factory.mktemp("demo")), layers=2)


def noisy_copy(folder: str, to: Path, seed: int = 1) -> Path:
    """A model of the same shape whose weights are unit-variance noise: a broken parent."""
    shutil.copytree(folder, to)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(to / "model.safetensors")
    noise = {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in tensors.items()}
    save_file(noise, to / "model.safetensors", metadata={"format": "pt"})
    return to


def linear(*models: str) -> dict[str, object]:
    return {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        "dtype": "bfloat16",
    }


def test_the_text_is_shipped_with_its_licence() -> None:
    text = quality_text()
    assert len(text.split()) > 1000 and text.isascii()
    readme = (Path(__import__("engine").__file__).parent / "data" / "README.md").read_text()
    assert "Apache-2.0" in readme


def test_uniform_logits_give_the_vocabulary_size_as_perplexity(demo: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "uniform"
    shutil.copytree(demo["tiny-base"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = torch.zeros_like(tensors["lm_head.weight"])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    report = check_quality(folder, options=SMALL)
    assert report.merge is not None
    assert report.merge.perplexity == pytest.approx(256.0, rel=1e-5)  # the demo vocabulary
    assert report.merge.tokens == SMALL.max_tokens  # the text is longer than the cap


def test_a_sane_merge_of_the_demo_fine_tunes_passes(demo: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = linear(demo["tiny-math"], demo["tiny-code"])
    run_merge(validate_recipe(recipe), out, options=MergeOptions(device="cpu"))
    report = check_quality(out, [demo["tiny-math"], demo["tiny-code"]], options=SMALL)
    assert report.status == "passed", report.reasons
    assert report.merge is not None and len(report.parents) == 2
    best = report.best_parent
    assert best is not None
    assert [p.reference for p in report.parents] == [demo["tiny-math"], demo["tiny-code"]]
    assert 1 < report.merge.perplexity < PPL_RATIO * best.perplexity
    assert len(report.merge.generations) == len(SMALL.prompts)
    assert "| this merge |" in report.markdown()


def test_a_merge_with_a_noise_parent_fails(demo: dict[str, str], tmp_path: Path) -> None:
    broken = noisy_copy(demo["tiny-code"], tmp_path / "noise")
    out = tmp_path / "out"
    run_merge(
        validate_recipe(linear(demo["tiny-math"], str(broken))), out, options=MergeOptions(device="cpu")
    )
    report = check_quality(out, [demo["tiny-math"]], options=SMALL)
    assert report.status == "failed" and not report.passed
    assert report.merge is not None and report.merge.perplexity > 10 * report.parents[0].perplexity
    assert any("perplexity" in reason for reason in report.reasons)
    assert "failed" in report.summary()


def test_a_model_without_a_tokenizer_is_skipped(demo: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    shutil.copytree(demo["tiny-base"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    report = check_quality(folder, [demo["tiny-base"]], options=SMALL)
    assert report.status == "skipped" and report.passed
    assert report.reasons == ("the model has no tokenizer",)
    assert report.merge is None and "skipped" in report.markdown()


@pytest.mark.parametrize(
    ("text", "ids", "problem"),
    [
        ("", [], "empty output"),
        ("  \n", [5], "empty output"),
        ("\ufffd\ufffd a", [1, 2, 3], "characters are not text"),
        ("the the the the", [7, 7, 7, 7, 7, 7, 7, 7], "repetitive"),
        ("a b c d e f g h", [1, 2, 3, 4, 5, 6, 7, 8], None),
        ("abab", [1, 2, 1, 2, 1, 2], None),  # 2 of 4 trigrams repeat: 50% is not above the limit
        ("ababa", [1, 2, 1, 2, 1, 2, 1], "repetitive"),  # 3 of 5
    ],
)
def test_degenerate_generations(text: str, ids: list[int], problem: str | None) -> None:
    found = degenerate_problem(text, ids)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def quality(ppl: float, degenerate: int = 0, name: str = "m") -> ModelQuality:
    gens = tuple(Generation(f"p{i}", "x", "empty output" if i < degenerate else None) for i in range(3))
    return ModelQuality(name, ppl, 100, gens)


def test_the_verdict_is_relative_to_the_best_parent() -> None:
    assert judge(quality(14.9), [quality(10.0), quality(30.0)]).status == "passed"
    failed = judge(quality(15.1), [quality(10.0), quality(30.0)])
    assert failed.status == "failed" and "1.5×" in failed.reasons[0]
    # below the floor, a doubling is not a failure
    assert judge(quality(PPL_FLOOR - 0.1), [quality(2.0)]).status == "passed"
    assert judge(quality(math.inf), [quality(2.0)]).status == "failed"
    assert judge(quality(math.nan), []).status == "failed"
    # degenerate generations: most of the merge's, and at least two more than any parent's
    assert judge(quality(10.0, degenerate=1), [quality(10.0, 0)]).status == "passed"
    assert judge(quality(10.0, degenerate=2), [quality(10.0, 0), quality(10.0, 2)]).status == "passed"
    assert judge(quality(10.0, degenerate=2), [quality(10.0, 1), quality(10.0, 1)]).status == "passed"
    worse = judge(quality(10.0, degenerate=2), [quality(10.0, 0), quality(10.0, 0)])
    assert worse.status == "failed" and "degenerate" in worse.reasons[0]
    worst = judge(quality(10.0, degenerate=3), [quality(10.0, 0), quality(10.0, 1)])
    assert worst.status == "failed" and "degenerate" in worst.reasons[0]
    assert judge(quality(10.0, degenerate=2)).status == "failed"  # no parents
    assert judge(quality(10.0, degenerate=1)).status == "passed"


def test_to_dict_is_json() -> None:
    report = judge(quality(math.inf), [quality(3.0, name="p")])
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["status"] == "failed" and data["merge"]["perplexity"] is None
    assert data["parents"][0]["perplexity"] == 3.0 and data["ratio"] == PPL_RATIO


def test_cli_eval_passes_a_good_merge_and_fails_a_broken_one(
    demo: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yml"
    good.write_text(json.dumps(linear(demo["tiny-math"], demo["tiny-code"])))
    assert (
        main(["merge", str(good), str(tmp_path / "good"), "--eval", "--no-progress", "--device", "cpu"]) == 0
    )
    assert "quality check passed" in capsys.readouterr().out

    broken = noisy_copy(demo["tiny-code"], tmp_path / "noise")
    bad = tmp_path / "bad.yml"
    bad.write_text(json.dumps(linear(demo["tiny-math"], str(broken))))
    out = tmp_path / "bad"
    assert main(["merge", str(bad), str(out), "--eval", "--no-progress", "--device", "cpu"]) == EXIT_QUALITY
    err = capsys.readouterr().err
    assert "quality check failed" in err and "perplexity" in err and f"kept in {out}" in err
    assert (out / "config.json").exists()  # kept for the user to inspect


def test_prompts_go_through_the_chat_template_when_there_is_one(demo: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "chat"
    shutil.copytree(demo["tiny-base"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # a template that drops the prompt: every prompt then gives the same greedy continuation
    config["chat_template"] = "{{ bos_token }}User: hello Bot:"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    report = check_quality(folder, options=SMALL)
    assert report.merge is not None
    assert len({g.text for g in report.merge.generations}) == 1
    plain = check_quality(demo["tiny-base"], options=SMALL)
    assert plain.merge is not None and len({g.text for g in plain.merge.generations}) > 1
