"""What the merge's anatomy (``mergebot merge --report``) costs: the same recipe with and without it.

Builds (once, cached) the Llama-shaped base and three fine-tunes of :mod:`_models`, then for
each method runs ``mergebot merge`` as a subprocess with and without ``--report``,
alternately, ``--runs`` times each. Why alternately and as a median ratio: the machine is
shared, so a slow patch hits both variants rather than one. The load average is printed with
every run, so a reader can judge how quiet the machine was. The merged bytes of the two
variants are compared too (the anatomy must observe, never change, the computation).

The engine is run from this checkout (``python -c 'from engine.cli import main'`` with this
folder first on ``PYTHONPATH``), not from whatever ``mergebot`` script is installed.

Usage:
    .venv/bin/python benchmarks/anatomy_overhead.py [--size tiny|0.5b|1.5b]
        [--methods ties,linear,...] [--runs 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _models import SIZES, build_models, output_weight_files
from engine_vs_mergekit import METHODS, SEED, recipe

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLI = "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))"


def load() -> str:
    """The 1-minute load average and the core count, as printed with each run."""
    return f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def merge(recipe_path: Path, out: Path, report: bool) -> float:
    """Wall seconds of one ``mergebot merge`` subprocess."""
    argv = [sys.executable, "-c", CLI, "merge", str(recipe_path), str(out), "--device", "cpu"]
    argv += ["--no-progress", "--overwrite", "--seed", str(SEED), *(["--report"] if report else [])]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in output_weight_files(folder):
        h.update(path.read_bytes())
    return h.hexdigest()


def bench(method: str, models: dict[str, Path], runs: int, work: Path) -> float:
    """Alternate plain and ``--report`` merges; print each run; return the median ratio."""
    recipe_path = work / f"{method}.yml"
    recipe_path.write_text(yaml.safe_dump(recipe(method, models), sort_keys=False))
    merge(recipe_path, work / "warm", False)  # page cache and imports warmed for both variants
    times: dict[bool, list[float]] = {False: [], True: []}
    ratios = []
    for run in range(runs):
        order = (False, True) if run % 2 == 0 else (True, False)
        pair = {}
        for report in order:
            out = work / ("report" if report else "plain")
            pair[report] = merge(recipe_path, out, report)
            times[report].append(pair[report])
            print(
                f"  {method} run {run + 1} {'--report' if report else 'plain   '}: {pair[report]:7.2f} s ({load()})"
            )
        ratios.append(pair[True] / pair[False])
    same = digest(work / "plain") == digest(work / "report")
    if not (work / "report" / "merge_report.json").exists():
        raise SystemExit("--report wrote no merge_report.json")
    ratio = statistics.median(ratios)
    print(
        f"{method}: plain median {statistics.median(times[False]):.2f} s, --report median "
        f"{statistics.median(times[True]):.2f} s, median ratio {ratio:.3f}, bytes identical: {same}"
    )
    if not same:
        raise SystemExit("the merged bytes differ with --report")
    for name in ("warm", "plain", "report"):
        shutil.rmtree(work / name, ignore_errors=True)
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--methods", default="ties,linear", help=f"comma-separated, of: {','.join(METHODS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--cache", type=Path, default=None, help="model cache (default benchmarks/.cache/SIZE)"
    )
    parser.add_argument("--work", type=Path, default=HERE / "out", help="recipes and outputs (deleted after)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    print(f"start: {load()}", flush=True)
    models = build_models(args.cache or HERE / ".cache" / args.size, SIZES[args.size])
    work = args.work / f"anatomy-{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    ratios = {method: bench(method, models, args.runs, work) for method in methods}
    print(f"end: {load()}")
    print("\n| method | median time ratio --report / plain |\n|---|---|")
    for method, ratio in ratios.items():
        print(f"| {method} | {ratio:.3f} |")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
