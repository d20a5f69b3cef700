"""What one evolutionary-search trial costs in memory, against merging to disk and loading the result.

For each size, builds (once, cached) a Llama-shaped base and fine-tunes with random weights, then
times, for the same recipes with fresh coefficients each run (DARE-TIES, the heaviest arithmetic,
and linear, the lightest, by default):

- in memory (what ``mergebot evolve`` does per trial): the engine's plan + method functions over
  resident inputs, copied into one resident transformers model (``InMemoryMerger`` +
  ``ResidentCausalLM.load``); the one-off set-up (reading the inputs, loading the model) is shown
  apart;
- to disk, in process: ``run_merge`` into a fresh folder, then
  ``AutoModelForCausalLM.from_pretrained`` of it (imports already paid);
- to disk, as a user would: the ``mergebot merge`` command (a new process: interpreter start-up
  and imports included), then ``from_pretrained`` in this process.

The ratios say how many in-memory trials fit in the time of one round trip through the disk.
Evaluation is the same in both cases and is left out. Medians of ``--runs`` runs.

Usage:
    .venv/bin/python benchmarks/evolve_trial_cost.py [--sizes tiny,100m] [--methods dare_ties,linear]
        [--runs 3] [--threads 1] [--cache DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _models import SIZES, Shape, build_models

from engine import load_recipe, run_merge
from engine.config import MergeConfig, validate_recipe
from engine.evolve import InMemoryMerger, ResidentCausalLM

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SHAPES: dict[str, Shape] = {
    "tiny": SIZES["tiny"],
    # 106M parameters (49M of them in the embeddings and head), 0.21 GB per model in bf16
    "100m": Shape(hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=12, vocab=32000, shards=1),
}


def recipe(models: dict[str, Path], rng: random.Random, method: str) -> MergeConfig:
    """A merge of two fine-tunes with fresh coefficients (what a trial would ask for)."""
    tunes: list[dict[str, Any]] = [
        {"model": str(models[name]), "parameters": {"weight": rng.uniform(0.2, 1.0)}}
        for name in ("ft1", "ft2")
    ]
    data: dict[str, Any] = {"merge_method": method, "models": tunes, "dtype": "bfloat16", "random_seed": 0}
    if method != "linear":
        data["base_model"] = str(models["base"])
        for tune in tunes:
            tune["parameters"]["density"] = rng.uniform(0.3, 1.0)
    return validate_recipe(data)


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    del model


def merge_and_load(config: MergeConfig, out: Path) -> None:
    run_merge(config, out)
    load(out)


def merge_command_and_load(recipe_path: Path, out: Path, threads: int) -> None:
    subprocess.run(
        [str(BIN / "mergebot"), "merge", str(recipe_path), str(out), "--no-progress", "--device", "cpu"],
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},  # as many threads as this process
    )
    load(out)


def measure(size: str, shape: Shape, cache: Path, runs: int, threads: int, method: str) -> dict[str, float]:
    models = build_models(cache / size, shape)
    rng = random.Random(0)
    result: dict[str, float] = {"parameters": float(shape.parameters())}

    start = time.perf_counter()
    merger = InMemoryMerger([str(models[n]) for n in ("base", "ft1", "ft2")])
    first = recipe(models, rng, method)
    lm = ResidentCausalLM(str(models["base"]), dtype=merger.output_dtype(first))
    result["setup"] = time.perf_counter() - start
    lm.load(merger.merge(first))  # warm-up

    # Alternately, so that a busy patch on a shared machine hits every variant rather than one.
    in_memory, in_process, command = [], [], []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for run in range(runs):
            config = recipe(models, rng, method)
            in_memory.append(timed(functools.partial(lambda c: lm.load(merger.merge(c)), config)))

            out = Path(tmp) / f"in-process-{run}"
            in_process.append(timed(functools.partial(merge_and_load, config, out)))
            shutil.rmtree(out)

            recipe_path = Path(tmp) / f"recipe-{run}.yml"
            recipe_path.write_text(config.to_yaml())
            load_recipe(recipe_path)  # the file is a valid recipe
            out = Path(tmp) / f"command-{run}"
            command.append(timed(functools.partial(merge_command_and_load, recipe_path, out, threads)))
            shutil.rmtree(out)
    result["in_memory"] = statistics.median(in_memory)
    result["in_process"] = statistics.median(in_process)
    result["command"] = statistics.median(command)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="tiny,100m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--methods", default="dare_ties,linear", help="comma-separated: dare_ties, ties, linear"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)"
    )
    parser.add_argument("--cache", type=Path, default=HERE / ".cache" / "evolve")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            print(f"measuring {size} {method} ...", file=sys.stderr, flush=True)
            rows.append(
                (size, method, measure(size, SHAPES[size], args.cache, args.runs, args.threads, method))
            )
    print(f"\nmedian of {args.runs} runs, {args.threads} CPU thread(s), base + 2 fine-tunes in bf16\n")
    print(
        "| size | method | set-up (once) | in-memory trial | run_merge + load | ratio "
        "| `mergebot merge` + load | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size, method, r in rows:
        print(
            f"| {size} ({r['parameters'] / 1e6:.1f}M) | {method} | {r['setup']:.2f} s | {r['in_memory']:.3f} s "
            f"| {r['in_process']:.3f} s | {r['in_process'] / r['in_memory']:.1f}x "
            f"| {r['command']:.2f} s | {r['command'] / r['in_memory']:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
