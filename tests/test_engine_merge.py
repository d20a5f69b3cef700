"""End-to-end merges on tiny real models: outputs, determinism, atomicity and bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import Family

from engine import (
    IncompatibleModelsError,
    MergeOptions,
    ModelNotFoundError,
    OutputError,
    UnsafeWeightsError,
    load_recipe,
    run_merge,
)
from engine.plan import build_plan
from engine.run import OpenModels, merge_tensor, resolve_device
from engine.writer import OutputTensor, ShardedWriter


def dare_recipe(family: Family, seed: int | None = None) -> str:
    base, a, b = family.base, family.finetunes[0], family.finetunes[1]
    text = (
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.6, density: 0.4}}\n"
        f"  - model: {b}\n    parameters: {{weight: [0.2, 0.8], density: 0.7}}\n"
    )
    return text + (f"random_seed: {seed}\n" if seed is not None else "")


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.suffix == ".safetensors" or p.name.endswith(".index.json")
    }


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_output_folder_has_everything(llama_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_merge(load_recipe(dare_recipe(llama_family, seed=3)), out)
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "mergekit_config.yml",
        "model.safetensors.index.json",
    } <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(all_tensors(out))
    assert index["metadata"]["total_size"] == result.bytes_written
    assert load_recipe(str(out / "mergekit_config.yml")).merge_method == "dare_ties"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_same_seed_same_bytes_and_seed_matters(llama_family: Family, tmp_path: Path) -> None:
    recipe = load_recipe(dare_recipe(llama_family, seed=7))
    run_merge(recipe, tmp_path / "one")
    run_merge(recipe, tmp_path / "two")
    assert digest(tmp_path / "one") == digest(tmp_path / "two")
    run_merge(recipe, tmp_path / "three", options=MergeOptions(seed=8))  # --seed overrides random_seed
    assert digest(tmp_path / "one") != digest(tmp_path / "three")


def test_bytes_do_not_depend_on_processing_order(llama_family: Family, tmp_path: Path) -> None:
    recipe = load_recipe(dare_recipe(llama_family, seed=5))
    run_merge(recipe, tmp_path / "forward", options=MergeOptions(out_shard_size=60_000))
    backward = tmp_path / "backward"
    backward.mkdir()
    with OpenModels(recipe, MergeOptions()) as opened:
        plan = build_plan(recipe, opened.metadata())
        writer = ShardedWriter(
            str(backward), [OutputTensor(t.name, t.dtype, t.shape) for t in plan.tasks], 60_000
        )
        for task in reversed(plan.tasks):
            writer.write(task.name, merge_tensor(plan, task, opened.sources, resolve_device("cpu")))
        writer.finish()
    forward = digest(tmp_path / "forward")
    assert len(forward) > 2  # several shards plus the index
    assert forward == digest(backward)


def test_shards_respect_out_shard_size_and_load_in_transformers(llama_family: Family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_merge(
        load_recipe(dare_recipe(llama_family, seed=1)), out, options=MergeOptions(out_shard_size=50_000)
    )
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    largest_tensor = max(t.numel() * t.element_size() for t in all_tensors(out).values())
    for shard in shards:
        assert shard.stat().st_size <= 50_000 + largest_tensor + 4096
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_passthrough_stacks_layers_and_sets_the_layer_count(qwen2_family: Family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, ft = qwen2_family.base, qwen2_family.finetunes[0]
    recipe = load_recipe(
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {base}\n        layer_range: [0, 3]\n"
        f"  - sources:\n      - model: {ft}\n        layer_range: [1, 4]\n"
    )
    out = tmp_path / "frankenmerge"
    run_merge(recipe, out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    if "layer_types" in config:
        assert len(config["layer_types"]) == 6
    merged = all_tensors(out)
    base_t, ft_t = all_tensors(base), all_tensors(ft)
    # output layer 4 is the fine-tune's layer 2 (second slice starts at its layer 1)
    key = "self_attn.q_proj.weight"
    assert torch.equal(merged[f"model.layers.4.{key}"], ft_t[f"model.layers.2.{key}"])
    assert torch.equal(merged[f"model.layers.2.{key}"], base_t[f"model.layers.2.{key}"])
    assert torch.equal(merged["model.norm.weight"], ft_t["model.norm.weight"])  # post weights: last slice
    assert torch.equal(merged["model.embed_tokens.weight"], base_t["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_injected_failure_leaves_nothing(
    llama_family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.run as run_module

    calls = {"n": 0}
    real = run_module.combine

    def failing(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError("disk on fire")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(run_module, "combine", failing)
    with pytest.raises(OSError, match="disk on fire"):
        run_merge(load_recipe(dare_recipe(llama_family)), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_clobbered(llama_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    recipe = load_recipe(dare_recipe(llama_family))
    with pytest.raises(OutputError, match="--overwrite"):
        run_merge(recipe, out)
    assert (out / "precious.txt").read_text() == "keep me"
    run_merge(recipe, out, options=MergeOptions(overwrite=True))
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()


def test_pickle_only_models_are_refused_unless_allowed(llama_family: Family, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(llama_family.finetunes[0], pickled)
    state = all_tensors(pickled)
    for f in list(pickled.glob("*.safetensors*")):
        f.unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    recipe = load_recipe(
        f"merge_method: linear\nmodels:\n  - model: {llama_family.base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {pickled}\n    parameters: {{weight: 1}}\n"
    )
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model.bin.*--allow-pickle"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    run_merge(recipe, tmp_path / "out", options=MergeOptions(allow_pickle=True))
    assert (tmp_path / "out" / "config.json").exists()


def test_missing_model_is_named(llama_family: Family, tmp_path: Path) -> None:
    recipe = load_recipe(
        f"merge_method: linear\nmodels:\n  - model: {llama_family.base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {tmp_path}/nope\n    parameters: {{weight: 1}}\n"
    )
    with pytest.raises(ModelNotFoundError, match=r"nope.*no model folder"):
        run_merge(recipe, tmp_path / "out")


def _mutated_copy(source: Path, dest: Path, mutate: dict[str, torch.Tensor | None]) -> Path:
    shutil.copytree(source, dest)
    state = all_tensors(dest)
    for f in dest.glob("*.safetensors*"):
        f.unlink()
    for name, value in mutate.items():
        if value is None:
            state.pop(name)
        else:
            state[name] = value
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_shape_and_name_mismatches_are_named(llama_family: Family, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    wrong = _mutated_copy(
        llama_family.finetunes[0], tmp_path / "wrong", {name: torch.zeros(3, 3, dtype=torch.bfloat16)}
    )
    missing = _mutated_copy(llama_family.finetunes[1], tmp_path / "missing", {name: None})
    for bad, pattern in (
        (wrong, rf"'{name}' has different shapes"),
        (missing, r"up_proj.weight.*no counterpart"),
    ):
        recipe = load_recipe(
            f"merge_method: ties\nbase_model: {llama_family.base}\nmodels:\n"
            f"  - model: {bad}\n    parameters: {{weight: 1, density: 0.5}}\n"
        )
        with pytest.raises(IncompatibleModelsError, match=pattern):
            run_merge(recipe, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_weights_summing_to_zero_fail_before_writing(llama_family: Family, tmp_path: Path) -> None:
    from engine.errors import RecipeError

    recipe = load_recipe(
        f"merge_method: linear\nmodels:\n  - model: {llama_family.base}\n    parameters: {{weight: [1, -1]}}\n"
        f"  - model: {llama_family.finetunes[0]}\n    parameters: {{weight: [-1, 1]}}\n"
    )
    with pytest.raises(RecipeError, match="sum to 0"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "mergebot", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_cli_merge_dry_run_check_and_errors(llama_family: Family, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(dare_recipe(llama_family, seed=2))
    dry = _cli("merge", str(recipe), str(tmp_path / "out"), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "method: dare_ties" in dry.stdout and "model.layers.0.mlp.up_proj.weight" in dry.stdout
    assert not (tmp_path / "out").exists()

    done = _cli(
        "merge",
        str(recipe),
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--lazy-unpickle",
        "--allow-crimes",
        "--out-shard-size",
        "1B",
        "--no-progress",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "merged" in done.stdout

    check = _cli("check", str(recipe), cwd=tmp_path)
    assert check.returncode == 0 and "LlamaForCausalLM" in check.stdout and "compatible" in check.stdout

    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: tiess\nmodels: [{model: a}]\n")
    failed = _cli("merge", str(bad), str(tmp_path / "out2"), cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: Invalid recipe") and "Traceback" not in failed.stderr
    assert not (tmp_path / "out2").exists()


def test_cli_check_refuses_a_mismatch_naming_the_field(
    llama_family: Family, mistral_family: Family, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {llama_family.base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {mistral_family.base}\n    parameters: {{weight: 1}}\n"
    )
    check = _cli("check", str(recipe), cwd=tmp_path)
    assert check.returncode == 1
    assert "architecture differs" in check.stderr and "MistralForCausalLM" in check.stderr
    merge = _cli("merge", str(recipe), str(tmp_path / "out"), cwd=tmp_path)
    assert merge.returncode == 1 and "not compatible" in merge.stderr and "Traceback" not in merge.stderr


def test_cli_refuses_a_hostile_shard_in_one_line(llama_family: Family, tmp_path: Path) -> None:
    hostile = tmp_path / "hostile"
    shutil.copytree(llama_family.finetunes[0], hostile)
    shard = next(hostile.glob("*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[0:8] = (len(raw) * 2).to_bytes(8, "little")  # header length beyond the end of the file
    shard.write_bytes(bytes(raw))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {llama_family.base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {hostile}\n    parameters: {{weight: 1}}\n"
    )
    done = _cli("merge", str(recipe), str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: Invalid safetensors file") and shard.name in lines[0]
    )
    assert not (tmp_path / "out").exists()


def test_on_shard_sees_each_finished_shard_once(llama_family: Family, tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def on_shard(path: str) -> None:
        data = Path(path).read_bytes()
        header_len = int.from_bytes(data[:8], "little")
        json.loads(data[8 : 8 + header_len])  # complete: the header and all bytes are there
        seen.append((Path(path).name, len(data)))

    result = run_merge(
        load_recipe(dare_recipe(llama_family, seed=1)),
        tmp_path / "out",
        options=MergeOptions(out_shard_size=50_000),
        on_shard=on_shard,
    )
    assert sorted(name for name, _ in seen) == sorted(result.shards)
    assert {name: size for name, size in seen} == {
        p.name: p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")
    }


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "passthrough", "ties", "dare_ties"])
def test_every_input_mode_gives_the_same_bytes(
    llama_family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    import engine.run as run_module

    base, a, b = llama_family.base, llama_family.finetunes[0], llama_family.finetunes[1]
    if method == "passthrough":
        text = f"merge_method: passthrough\nmodels:\n  - model: {a}\n    parameters: {{scale: 0.7}}\n"
    elif method in ("ties", "dare_ties"):
        text = (
            f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: [0.2, 0.9], density: 0.4}}\n"
            f"  - model: {b}\n    parameters: {{weight: -0.4, density: 0.7}}\ndtype: bfloat16\n"
        )
    else:
        base_line = f"base_model: {base}\n" if method == "task_arithmetic" else ""
        text = (
            f"merge_method: {method}\n{base_line}models:\n"
            f"  - model: {a}\n    parameters: {{weight: [0.2, 0.9]}}\n"
            f"  - model: {b}\n    parameters: {{weight: -0.4}}\ndtype: bfloat16\n"
        )
    recipe = load_recipe(text)
    monkeypatch.setattr(run_module, "SLICE_ELEMENTS", 100)  # many slices, ragged last one
    run_merge(recipe, tmp_path / "default")  # the fused kernels where they run
    chosen = run_module.input_mode
    for mode in ("slices", "read"):
        monkeypatch.setattr(
            run_module,
            "input_mode",
            lambda plan, *args, m=mode: m if m == "read" or plan.method.elementwise else "read",
        )
        run_merge(recipe, tmp_path / mode)
        assert digest(tmp_path / mode) == digest(tmp_path / "default"), mode
    monkeypatch.setattr(run_module, "input_mode", chosen)
    monkeypatch.setenv("MERGEBOT_KERNELS", "torch")  # streaming methods in torch, from views
    run_merge(recipe, tmp_path / "torch")
    assert digest(tmp_path / "torch") == digest(tmp_path / "default")
