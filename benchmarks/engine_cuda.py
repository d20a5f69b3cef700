"""``--device cuda`` against the CPU: the same recipes, equal results, and the time each takes.

Run it on a machine with a GPU (the test suite never needs one)::

    python benchmarks/engine_cuda.py --size 0.5b --methods linear,ties,dare_ties --out cuda.md

It builds the benchmark models (benchmarks/_models.py), merges each recipe of
benchmarks/engine_vs_mergekit.py with ``run_merge`` on the CPU and on the GPU (in-process,
after one warm-up merge so CUDA's start-up is not counted twice), and compares every output
tensor: the share of bit-identical elements and the largest difference in units of the
output's last place. Random methods (DARE) draw their masks on the CPU either way, so they
compare exactly too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _models import SIZES, build_models
from engine_vs_mergekit import recipe

from engine.config import load_recipe
from engine.run import MergeOptions, run_merge


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = f.get_tensor(name)
    return out


def compare(cpu: Path, gpu: Path) -> dict[str, float]:
    """Bit-identical share and the largest gap in bf16 ulps (of the larger magnitude)."""
    a, b = _tensors(cpu), _tensors(gpu)
    same = total = 0
    worst = 0.0
    for name, x in a.items():
        y = b[name]
        same += (
            int((x.view(torch.int16) == y.view(torch.int16)).sum())
            if x.dtype == torch.bfloat16
            else int((x == y).sum())
        )
        total += x.numel()
        gap = (x.float() - y.float()).abs()
        ulp = torch.maximum(x.float().abs(), y.float().abs()).clamp_min(1e-30) * 2.0**-7
        worst = max(worst, float((gap / ulp).max()))
    return {"identical": same / total, "max_ulps": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.5b", choices=sorted(SIZES))
    parser.add_argument("--methods", default="linear,slerp,task_arithmetic,ties,dare_ties,breadcrumbs_ties")
    parser.add_argument("--work", default="/tmp/mergebot-cuda")
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    parser.add_argument("--against", default="cuda", help="the device compared with the CPU (cpu: a dry run)")
    args = parser.parse_args()
    gpu = args.against
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here (use --against cpu for a dry run of this script)", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if gpu.startswith("cuda") else (lambda: None)
    work = Path(args.work)
    start = time.perf_counter()
    models = build_models(work / "models", SIZES[args.size])
    print(f"models ready in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    warm = True
    for method in args.methods.split(","):
        config = load_recipe(json.dumps(recipe(method, models)))
        times = {}
        for device in ("cpu", gpu):
            out = work / f"{method}-{device}"
            shutil.rmtree(out, ignore_errors=True)
            if device == gpu and warm:  # CUDA context and kernels, once
                run_merge(config, work / "warmup", options=MergeOptions(device=gpu, overwrite=True))
                warm = False
            sync()
            begin = time.perf_counter()
            run_merge(config, out, options=MergeOptions(device=device))
            sync()
            times[device] = time.perf_counter() - begin
        result = compare(work / f"{method}-cpu", work / f"{method}-{gpu}")
        row = (
            f"| {method} | {times['cpu']:.2f} | {times[gpu]:.2f} | {times['cpu'] / times[gpu]:.2f} | "
            f"{100 * result['identical']:.4f}% | {result['max_ulps']:.2f} |"
        )
        print(row, flush=True)
        rows.append(row)
    name = torch.cuda.get_device_name() if gpu.startswith("cuda") else gpu
    header = [
        f"device: {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        "",
        f"| method | CPU s | {gpu} s | CPU/{gpu} | bit-identical | max gap (bf16 ulps) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
