"""Peak memory is bounded by a few tensors, not by the model (engine/run.py states the bound)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROWS, COLS, LAYERS = 1024, 2048, 48  # 48 tensors of 2M bf16 elements = 192 MiB per model


def write_model(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(ROWS, COLS, generator=g).to(torch.bfloat16)
        for i in range(LAYERS)
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": LAYERS})
    )


@pytest.mark.slow
def test_peak_rss_of_a_ties_merge_is_bounded_by_a_few_tensors(tmp_path: Path) -> None:
    models = [tmp_path / name for name in ("base", "a", "b")]
    for seed, folder in enumerate(models):
        write_model(folder, seed)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {models[0]}\nmodels:\n"
        f"  - model: {models[1]}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        f"  - model: {models[2]}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
    )

    def peak_rss(*args: str) -> int:
        """Peak RSS in bytes of `mergebot ARGS`, run as a child of a fresh wrapper process."""
        wrapper = (
            "import resource, subprocess, sys; "
            f"subprocess.run([sys.executable, '-m', 'mergebot', *{list(args)!r}], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
        )
        done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    # the same process reading only headers: imports, interpreter and plan
    before = peak_rss("merge", str(recipe), str(tmp_path / "out"), "--dry-run")
    after = peak_rss("merge", str(recipe), str(tmp_path / "out"), "--no-progress")
    model_bytes = sum((m / "model.safetensors").stat().st_size for m in models)
    tensor_f32 = ROWS * COLS * 4
    n_inputs = 3
    bound = (3 * n_inputs + 8) * tensor_f32  # the bound documented in engine/run.py
    growth = after - before
    assert model_bytes > 4 * bound  # the inputs are far larger than the bound
    print(
        f"peak RSS growth {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, inputs {model_bytes / 2**20:.0f} MiB"
    )
    assert growth < bound, f"peak grew by {growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB"


@pytest.mark.slow
def test_peak_rss_of_a_lora_extraction_is_bounded_by_a_few_tensors(tmp_path: Path) -> None:
    """Reading, factoring and writing one module at a time: neither the models nor the adapter stay resident."""
    rows, cols, layers = 256, 8192, 24  # tensors as large as above, a quarter of the SVD's work
    base, finetune = tmp_path / "base", tmp_path / "ft"
    for seed, folder in enumerate((base, finetune)):
        folder.mkdir()
        g = torch.Generator().manual_seed(seed)
        tensors = {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(rows, cols, generator=g).to(torch.bfloat16)
            for i in range(layers)
        }
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))

    def peak_rss(*args: str) -> int:
        wrapper = (
            "import resource, subprocess, sys; "
            f"subprocess.run([sys.executable, '-m', 'mergebot', *{list(args)!r}]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
        )
        done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=600)
        return int(done.stdout.split()[-1])

    common = [
        "extract-lora",
        "--base",
        str(base),
        "--model",
        str(finetune),
        "--no-progress",
        "--device",
        "cpu",
    ]
    # the same imports, refused before any tensor is read (rank 0)
    before = peak_rss(*common, "--rank", "0", str(tmp_path / "refused"))
    after = peak_rss(*common, "--rank", str(rows), str(tmp_path / "adapter"))
    adapter = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    bound = 12 * rows * cols * 4  # the bound documented in engine/extract_lora.py (10-12 copies)
    growth = after - before
    inputs = 2 * (base / "model.safetensors").stat().st_size
    assert inputs + adapter > 3 * bound
    print(
        f"peak RSS growth {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, adapter {adapter / 2**20:.0f} MiB"
    )
    assert growth < bound, f"peak grew by {growth / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB"
