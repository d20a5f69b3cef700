"""mergebot's engine against mergekit on CPU: wall time and peak memory of the same recipes.

Builds (once, cached) a Llama-shaped base and three fine-tunes, then for each requested
method runs ``mergebot merge`` and ``mergekit-yaml`` as subprocesses on the same recipe,
alternately, ``--runs`` times each. Why alternately and as ratios: the machine is shared
(tests may run beside the benchmark), so a slow patch hits both tools rather than one.
Each round also measures the I/O floor (read the method's input bytes, write an output of
the merged model's size, from and to the page cache, as both tools do): the best any
merge could do on this machine.

Peak memory is GNU time's maximum resident set size of each process. Outputs are deleted
between runs, outside the timed region. Results are printed as a markdown table and
written to benchmarks/RESULTS.md (one section per size and method set, replaced on re-run).

Usage:
    .venv/bin/python benchmarks/engine_vs_mergekit.py [--size 0.5b|1.5b|tiny]
        [--methods linear,ties,...] [--runs 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from _models import SIZES, build_models, output_weight_files, weight_files
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MiB = 1024 * 1024
CHUNK = 16 * MiB
SEED = 42
FLOOR_SAMPLES = 3
CHECK_TENSOR = "model.layers.0.mlp.down_proj.weight"
METHODS = (
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs_ties",
    "della",
    "model_stock",
)
RANDOM_METHODS = frozenset({"dare_ties", "della"})  # masks drawn differently: no tensor check
Tool = Literal["mergebot", "mergekit"]


def recipe(method: str, models: dict[str, Path]) -> dict[str, Any]:
    """The mergekit recipe for ``method`` over the benchmark models (why these: typical settings)."""
    base, fts = str(models["base"]), [str(models[n]) for n in ("ft1", "ft2", "ft3")]
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": fts[0], "parameters": {"weight": 0.6}},
                {"model": fts[1], "parameters": {"weight": 0.4}},
            ],
            "dtype": "bfloat16",
        }
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": fts[0]}],
            "parameters": {"t": 0.5},
            "dtype": "bfloat16",
        }
    per_model: dict[str, dict[str, float]] = {
        "task_arithmetic": {"weight": 0.5},
        "ties": {"weight": 0.5, "density": 0.5},
        "dare_ties": {"weight": 0.5, "density": 0.5},
        "breadcrumbs_ties": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
        "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1, "lambda": 1.0},
        "model_stock": {},
    }
    if method not in per_model:
        raise ValueError(f"no recipe for '{method}'; choose from {', '.join(METHODS)}")
    merged: dict[str, Any] = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": m, "parameters": dict(per_model[method])} for m in fts],
        "dtype": "bfloat16",
    }
    if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
        merged["parameters"] = {"normalize": True}
    if method == "model_stock":
        merged["models"] = [{"model": m} for m in fts]
    return merged


def recipe_inputs(merged: dict[str, Any]) -> list[Path]:
    """Every weight file a recipe reads."""
    models = {str(m["model"]) for m in merged["models"]}
    if "base_model" in merged:
        models.add(str(merged["base_model"]))
    return [f for m in sorted(models) for f in weight_files(Path(m))]


def command(tool: Tool, recipe_path: Path, out: Path) -> list[str]:
    """The command line each tool is timed with (its CPU, low-memory settings)."""
    if tool == "mergebot":
        flags = ["--device", "cpu", "--no-progress", "--overwrite", "--seed", str(SEED)]
        return [str(BIN / "mergebot"), "merge", str(recipe_path), str(out), *flags]
    flags = ["--lazy-unpickle", "--quiet", "--random-seed", str(SEED)]
    return [str(BIN / "mergekit-yaml"), str(recipe_path), str(out), *flags]


@dataclass(frozen=True)
class Run:
    """One timed subprocess: wall seconds, peak RSS in bytes, exit status, and its last words."""

    wall_s: float
    peak_rss: int
    returncode: int
    tail: str


def timed_run(argv: list[str]) -> Run:
    """Run ``argv`` under GNU time (peak RSS) and time it with perf_counter."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as rss_file:
        wrapped = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *argv]
        start = time.perf_counter()
        proc = subprocess.run(wrapped, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        lines = [line for line in Path(rss_file.name).read_text().splitlines() if line.strip()]
    peak_kb = int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return Run(wall, peak_kb * 1024, proc.returncode, tail)


def read_all(files: list[Path]) -> int:
    """Read every byte of ``files`` (into one reused buffer) and return the count."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    for path in files:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> float:
    """Seconds to read the inputs and write ``out_bytes`` of zeros (no fsync: neither tool does)."""
    zeros = bytes(CHUNK)
    target = scratch / "floor.bin"
    start = time.perf_counter()
    read_all(inputs)
    with target.open("wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            left -= f.write(zeros[: min(CHUNK, left)])
    wall = time.perf_counter() - start
    target.unlink()
    return wall


def supported_by_mergebot(recipe_path: Path, scratch: Path) -> tuple[bool, str]:
    """Ask ``mergebot merge --dry-run`` whether it knows the method (no tensor is read)."""
    argv = [str(BIN / "mergebot"), "merge", str(recipe_path), str(scratch / "dry"), "--dry-run"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True, ""
    return False, (proc.stderr or proc.stdout).strip().splitlines()[-1]


def read_tensor(folder: Path, name: str) -> torch.Tensor:
    for path in output_weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                return f.get_tensor(name)
    raise KeyError(f"{name} not in {folder}")


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries do not blow it up."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_tensor(method: str, merged: dict[str, Any], ours: Path, theirs: Path) -> str:
    """Compare one tensor of both outputs (and, for linear, against an fp32 reference)."""
    a, b = read_tensor(ours, CHECK_TENSOR), read_tensor(theirs, CHECK_TENSOR)
    text = (
        f"`{CHECK_TENSOR}`: mergebot vs mergekit max rel diff {max_rel_diff(a, b):.2e}, "
        f"{float((a == b).float().mean()) * 100:.2f}% of elements bit-identical"
    )
    if method == "linear":
        reference = torch.zeros(a.shape)  # fp32 sum of the weighted inputs, rounded once
        for m in merged["models"]:
            reference += (
                float(m["parameters"]["weight"]) * read_tensor(Path(m["model"]), CHECK_TENSOR).float()
            )
        ref = reference.to(torch.bfloat16)
        text += (
            f"; vs fp32 reference rounded to bf16: mergebot {max_rel_diff(a, ref):.2e}, "
            f"mergekit {max_rel_diff(b, ref):.2e}"
        )
    return text


@dataclass
class MethodResult:
    """What one method's rounds produced (mutable: filled in round by round)."""

    method: str
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"mergebot": [], "mergekit": []})
    floor_s: list[float] = field(default_factory=list)
    input_bytes: int = 0
    note: str = ""

    def median_wall(self, tool: Tool) -> float:
        return statistics.median(r.wall_s for r in self.runs[tool]) if self.runs[tool] else math.nan

    def max_rss(self, tool: Tool) -> int:
        return max((r.peak_rss for r in self.runs[tool]), default=0)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def bench_method(method: str, models: dict[str, Path], runs: int, work: Path) -> MethodResult:
    """Warm the cache, then alternate mergebot and mergekit ``runs`` times, with floor samples."""
    result = MethodResult(method)
    merged = recipe(method, models)
    recipe_path = work / f"{method}.yml"
    recipe_path.write_text(yaml.safe_dump(merged, sort_keys=False))
    ok, why = supported_by_mergebot(recipe_path, work)
    if not ok:
        result.note = f"skipped: mergebot says `{why}`"
        print(f"[{method}] {result.note}", flush=True)
        return result
    inputs = recipe_inputs(merged)
    out_bytes = sum(f.stat().st_size for f in weight_files(models["base"]))  # same shapes and dtype
    result.input_bytes = read_all(inputs)  # warms the page cache
    outs: dict[Tool, Path] = {"mergebot": work / "out-mergebot", "mergekit": work / "out-mergekit"}
    per_round = math.ceil(FLOOR_SAMPLES / runs)
    failed: dict[str, str] = {}
    for r in range(runs):
        for _ in range(per_round):
            result.floor_s.append(io_floor(inputs, out_bytes, work))
            print(f"[{method}] run {r + 1}/{runs} I/O floor {result.floor_s[-1]:8.2f} s", flush=True)
        order: tuple[Tool, ...] = ("mergebot", "mergekit") if r % 2 == 0 else ("mergekit", "mergebot")
        for tool in order:
            if tool in failed:
                continue
            remove(outs[tool])  # outside the timed region
            run = timed_run(command(tool, recipe_path, outs[tool]))
            if run.returncode != 0:
                failed[tool] = run.tail
                print(
                    f"[{method}] {tool} run {r + 1} FAILED (exit {run.returncode}):\n{run.tail}", flush=True
                )
                continue
            result.runs[tool].append(run)
            print(
                f"[{method}] run {r + 1}/{runs} {tool:8s} {run.wall_s:8.2f} s  "
                f"peak RSS {run.peak_rss / MiB:8.0f} MiB",
                flush=True,
            )
    notes = [f"{tool} failed: `{tail.splitlines()[-1] if tail else '?'}`" for tool, tail in failed.items()]
    if not failed and method not in RANDOM_METHODS:
        notes.append(check_tensor(method, merged, outs["mergebot"], outs["mergekit"]))
    result.note = "; ".join(notes)
    for out in outs.values():
        remove(out)
    return result


def human(n: float, unit: str = "B") -> str:
    """1234567 -> '1.23 MB': sizes that read well for tiny and 1.5B models alike."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def table(results: list[MethodResult]) -> str:
    """The markdown table: medians of wall time, max of peak RSS, and the ratios."""
    head = (
        "| method | mergebot s | mergekit s | time ours/mk | mergebot RSS MiB | mergekit RSS MiB "
        "| RSS ours/mk | I/O floor s | ours/floor | mk/floor | runs |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for res in results:
        if not res.runs["mergebot"] and not res.runs["mergekit"]:
            rows.append(f"| {res.method} | " + " | ".join(["—"] * 10) + " |")
            continue
        ours, mk = res.median_wall("mergebot"), res.median_wall("mergekit")
        floor = statistics.median(res.floor_s) if res.floor_s else math.nan
        rss_ours, rss_mk = res.max_rss("mergebot"), res.max_rss("mergekit")
        rows.append(
            f"| {res.method} | {ours:.2f} | {mk:.2f} | **{ratio(ours, mk)}** | {rss_ours / MiB:.0f} "
            f"| {rss_mk / MiB:.0f} | **{ratio(rss_ours, rss_mk)}** | {floor:.2f} | {ratio(ours, floor)} "
            f"| {ratio(mk, floor)} | {len(res.runs['mergebot'])}+{len(res.runs['mergekit'])} |"
        )
    return head + "\n".join(rows) + "\n"


def machine() -> str:
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = ", ".join(
        f"{pkg} {importlib.metadata.version(pkg)}" for pkg in ("mergebot", "mergekit", "torch", "safetensors")
    )
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}), {mem_kb / MiB:.1f} GiB RAM; {versions}"


def section(args: argparse.Namespace, results: list[MethodResult], started: str, loads: list[str]) -> str:
    shape = SIZES[args.size]
    model_bytes = shape.parameters() * 2
    lines = [
        f"## {args.size}: {', '.join(args.methods)}",
        "",
        f"- date: {started} (UTC); command: `.venv/bin/python benchmarks/engine_vs_mergekit.py "
        f"--size {args.size} --methods {','.join(args.methods)} --runs {args.runs}`",
        f"- machine: {machine()}",
        f"- models: Llama-shaped, hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.layers} layers, vocab {shape.vocab}, untied lm_head: {human(shape.parameters(), '')} "
        f"parameters, {human(model_bytes)} per model (bf16, {shape.shards} shards)",
        f"- load average (1 min) at start / end: {loads[0]} / {loads[1]} (other jobs share the machine)",
        "- time: median wall seconds of the subprocess; RSS: max over runs of GNU time's peak RSS; "
        "I/O floor: read the method's inputs + write an output-sized file, page cache, no fsync",
        "",
        table(results),
    ]
    notes = [f"- {r.method}: input {human(r.input_bytes)}; {r.note}" for r in results if r.note]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    """Replace the section with the same heading, or append a new one."""
    heading = text.splitlines()[0]
    title = "# mergebot engine vs mergekit (CPU)\n\nWritten by `benchmarks/engine_vs_mergekit.py`.\n"
    old = path.read_text() if path.exists() else title
    sections = old.split("\n## ")
    head, rest = sections[0], ["## " + s for s in sections[1:]]
    kept = [s for s in rest if s.splitlines()[0] != heading]
    body = [head.rstrip("\n") + "\n", *(s.rstrip("\n") + "\n" for s in kept), text.rstrip("\n") + "\n"]
    path.write_text("\n".join(body))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--methods", default="linear,ties", help=f"comma-separated, of: {','.join(METHODS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--cache", type=Path, default=None, help="model cache (default benchmarks/.cache/SIZE)"
    )
    parser.add_argument("--work", type=Path, default=HERE / "out", help="recipes and outputs (deleted after)")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    loads = [f"{os.getloadavg()[0]:.2f}"]
    cache = args.cache or HERE / ".cache" / args.size
    start = time.perf_counter()
    models = build_models(cache, SIZES[args.size])
    print(f"models ready in {time.perf_counter() - start:.1f} s under {cache}", flush=True)
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    results = [bench_method(method, models, args.runs, work) for method in args.methods]
    loads.append(f"{os.getloadavg()[0]:.2f}")
    text = section(args, results, started, loads)
    print("\n" + text)
    write_results(HERE / "RESULTS.md", text)
    remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
