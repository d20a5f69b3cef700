"""LoRA extraction: the adapter loads in PEFT, holds the optimal rank-r deltas, and reads back alike.

The fine-tunes are tiny Llama families (``base + 2% noise`` per tensor, so every delta is
full-rank and a rank-r adapter has a real, computable error: Eckart–Young says the best is
the norm of the discarded singular values, which the test computes in float64).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import load_tensors
from safetensors.torch import load_file
from tiny_models import Family, ModelSpec, build_family

from engine import IncompatibleModelsError, MergeError, OutputError
from engine.extract_lora import ExtractOptions, ExtractResult, extract_lora, parse_rank_per_module
from engine.sources import open_model
from mergebot.cli import main as mergebot_main

PREFIX = "base_model.model."


def adapter_updates(adapter: Path) -> dict[str, torch.Tensor]:
    """Each adapted base tensor's update ``scale * B @ A`` (transposed for embeddings), in float64."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    updates: dict[str, torch.Tensor] = {}
    for key, a in factors.items():
        for kind, transpose in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if key.endswith(kind):
                module = key.removeprefix(PREFIX).removesuffix(kind)
                b = factors[key.replace("_A", "_B")]
                r = config["rank_pattern"].get(module, config["r"])
                alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
                assert a.shape[0] == r and alpha == r  # scale 1, as the extraction intends
                delta = (b.double() @ a.double()) * (alpha / r)
                updates[f"{module}.weight"] = delta.T if transpose else delta
    return updates


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, adapter)
    with warnings.catch_warnings():
        # PEFT cautions that merging into tied weights changes the head too: here that is the point
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True. and the tied_target_modules")
        merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young: the Frobenius error of the best rank-``rank`` approximation, in float64."""
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt())


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, llama_family: Family) -> tuple[Path, ExtractResult]:
    """Rank 4 everywhere but the value projections (2), embeddings as LoRA (the default)."""
    out = tmp_path_factory.mktemp("extract") / "adapter"
    options = ExtractOptions(rank=4, rank_per_module={"v_proj": 2}, device="cpu")
    return out, extract_lora(str(llama_family.base), str(llama_family.finetunes[0]), out, options)


def test_peft_merge_and_unload_is_base_plus_b_at_a(llama_family: Family, extracted: tuple[Path, Any]) -> None:
    out, result = extracted
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    updates = adapter_updates(out)
    # every 2-D weight has an update: linears, lm_head, and the embedding as lora_embedding_A/B
    assert "model.embed_tokens.weight" in updates and "lm_head.weight" in updates
    assert len(updates) == len(result.modules) == 4 * 7 + 2
    merged = peft_merged(llama_family.base, out)
    base = load_tensors(llama_family.base)
    assert sorted(merged) == sorted(base)
    for name, want in base.items():
        expected = want.double() + updates.get(name, torch.zeros(()))
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-6, msg=name)
    # mergebot's own base+adapter reference reads the same tensors as PEFT's merge
    with closing(open_model(f"{llama_family.base}+{out}")) as source:
        for name, want in merged.items():
            torch.testing.assert_close(source.read(name, torch.float32), want, rtol=1e-6, atol=1e-7, msg=name)


def test_each_module_is_the_optimal_rank_r_approximation(
    llama_family: Family, extracted: tuple[Path, ExtractResult]
) -> None:
    out, result = extracted
    base, finetune = load_tensors(llama_family.base), load_tensors(llama_family.finetunes[0])
    updates = adapter_updates(out)
    reported = {f"{m.module}.weight": m for m in result.modules}
    for name, update in updates.items():
        delta = finetune[name].double() - base[name].double()
        rank = 2 if ".v_proj." in name else 4
        assert reported[name].rank == rank
        best = optimal_error(delta, rank)
        got = float((delta - update).norm())
        assert best > 0 and abs(got - best) <= 1e-3 * best, f"{name}: {got} vs optimal {best}"
        assert abs(reported[name].error - best) <= 1e-3 * best
        # one rank fewer would be worse: the adapter does use its whole rank
        assert optimal_error(delta, rank - 1) > got * (1 + 1e-3)


def test_full_rank_reconstructs_the_finetune(llama_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "full"
    finetune = str(llama_family.finetunes[0])
    result = extract_lora(str(llama_family.base), finetune, out, ExtractOptions(rank=1000, device="cpu"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 1000 and config["rank_pattern"]["model.layers.0.mlp.down_proj"] == 32
    assert all(m.error <= 1e-5 * m.delta_norm for m in result.modules)
    merged = peft_merged(llama_family.base, out)
    want, base = load_tensors(llama_family.finetunes[0]), load_tensors(llama_family.base)
    for name, tensor in want.items():
        if tensor.dim() == 2:
            torch.testing.assert_close(merged[name], tensor.float(), rtol=1e-5, atol=1e-6, msg=name)
        else:  # norms: not a LoRA's to change; the note says so
            assert torch.equal(merged[name], base[name].float())
    assert any("at the base's values" in note and "norm" in note for note in result.notes)


def test_tied_embeddings_follow_peft_weight_tying(llama_family_f32: Family, tmp_path: Path) -> None:
    """A tied head gets the embedding's LoRA transposed, with ``ensure_weight_tying`` (as PEFT saves it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family = llama_family_f32
    out = tmp_path / "tied"
    extract_lora(str(family.base), str(family.finetunes[0]), out, ExtractOptions(rank=1000, device="cpu"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and config["rank_pattern"]["lm_head"] == 32
    factors = load_file(str(out / "adapter_model.safetensors"))
    embed = f"{PREFIX}model.embed_tokens"
    assert torch.equal(factors[f"{PREFIX}lm_head.lora_A.weight"], factors[f"{embed}.lora_embedding_B"].T)
    finetune, base = load_tensors(family.finetunes[0]), load_tensors(family.base)
    with closing(open_model(f"{family.base}+{out}")) as source:
        assert "lm_head.weight" not in source.tensors()
        reference = {n: source.read(n, torch.float32) for n in source.tensors()}
    for name, tensor in finetune.items():
        torch.testing.assert_close(reference[name], tensor if tensor.dim() == 2 else base[name], msg=name)
    # PEFT's unmerged forward (the head adapted through its tied LoRA) is the model mergebot reads
    model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    expected = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    expected.load_state_dict(reference, strict=False)
    ids = torch.tensor([[1, 5, 9, 20, 33, 70]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(model, out)(ids).logits
        torch.testing.assert_close(got, expected(ids).logits, rtol=1e-5, atol=1e-5)


def test_rank_per_module_and_modules_to_save(llama_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "saved"
    options = ExtractOptions(
        rank=3,
        rank_per_module={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 5},
        modules_to_save=("lm_head", "norm"),  # PEFT's rule: every module whose path ends with "norm"
        embed_lora=False,
        device="cpu",
    )
    result = extract_lora(str(llama_family.base), str(llama_family.finetunes[0]), out, options)
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(str(out / "adapter_model.safetensors"))
    assert config["modules_to_save"] == ["lm_head", "norm", "embed_tokens"]
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    ranks = {m.module: m.rank for m in result.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2
    assert ranks["model.layers.1.mlp.down_proj"] == 5 and ranks["model.layers.0.mlp.down_proj"] == 3
    assert factors[f"{PREFIX}model.layers.3.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert factors[f"{PREFIX}model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 5)
    assert config["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 2
    assert not any(".lora_embedding_" in k for k in factors)
    saved = {k.removeprefix(PREFIX) for k in factors if ".lora_" not in k}
    finetune, base = load_tensors(llama_family.finetunes[0]), load_tensors(llama_family.base)
    whole = {n for n in finetune if n.endswith("norm.weight")} | {
        "lm_head.weight",
        "model.embed_tokens.weight",
    }
    assert saved == whole == set(result.saved)
    assert not result.notes  # nothing changed is left out
    merged = peft_merged(llama_family.base, out)
    for name in whole:
        torch.testing.assert_close(merged[name], finetune[name].float(), rtol=0, atol=0, msg=name)
    with closing(open_model(f"{llama_family.base}+{out}")) as source:
        for name, want in merged.items():
            torch.testing.assert_close(source.read(name, torch.float32), want, rtol=1e-6, atol=1e-7, msg=name)
            if name not in whole and want.dim() == 1:
                assert torch.equal(want, base[name].float())


def test_cli_writes_a_card_naming_the_base(llama_family: Family, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    argv = ["extract-lora", "--base", str(llama_family.base), "--model", str(llama_family.finetunes[1])]
    argv += ["--rank", "2", "--rank-per-module", "o_proj=1,up_proj=3", "--modules-to-save", "lm_head"]
    assert mergebot_main([*argv, "--no-progress", "--device", "cpu", str(out)]) == 0
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert f"base_model: {json.dumps(str(llama_family.base))}" in front
    assert "base_model_relation: adapter" in front and "library_name: peft" in front
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["base_model_name_or_path"] == str(
        llama_family.base
    )
    assert config["rank_pattern"]["model.layers.2.self_attn.o_proj"] == 1
    assert config["rank_pattern"]["model.layers.2.mlp.up_proj"] == 3
    # mergekit-extract-lora's spelling of the same flags
    again = tmp_path / "mergekit-flags"
    argv = ["extract-lora", "--base-model", str(llama_family.base), "--model", str(llama_family.finetunes[1])]
    assert (
        mergebot_main([*argv, "--max-rank", "2", "--save-module", "lm_head", "--out-path", str(again)]) == 0
    )
    assert json.loads((again / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]


def test_rank_per_module_syntax() -> None:
    assert parse_rank_per_module("q_proj=8, v_proj:16 mlp\\.down_proj=2") == {
        "q_proj": 8,
        "v_proj": 16,
        "mlp\\.down_proj": 2,
    }
    for bad in ("q_proj", "q_proj=0", "q_proj=x", "=4", ""):
        with pytest.raises(MergeError, match="rank-per-module"):
            parse_rank_per_module(bad)


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama with a wider MLP (shapes differ) and a Mistral of the Llama's shapes (architecture differs)."""
    root = tmp_path_factory.mktemp("odd")
    wide = build_family(root / "wide", ModelSpec(intermediate_size=48), n_finetunes=0, seed=7).base
    mistral = build_family(root / "mistral", ModelSpec(arch="mistral"), n_finetunes=0, seed=8).base
    return {"wide": wide, "mistral": mistral}


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("rank 0", MergeError, r"--rank must be a positive whole number, not 0"),
        ("rank per module -1", MergeError, r"--rank-per-module: 'q_proj=-1' is not PATTERN=RANK"),
        ("shapes", IncompatibleModelsError, r"mlp\.down_proj\.weight' is \[32, 48\].*equal shapes"),
        ("architecture", IncompatibleModelsError, r"not of the base's architecture: architectures"),
        ("out not empty", OutputError, r"exists and is not empty"),
        ("module to save", MergeError, r"--modules-to-save: 'vision_tower' names no module"),
        ("rank pattern", MergeError, r"--rank-per-module: 'qproj' matches no module"),
        ("same model", IncompatibleModelsError, r"has no weight that differs .* nothing to extract"),
    ],
)
def test_bad_input_gets_one_message_and_writes_nothing(
    llama_family: Family,
    odd_models: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    error: type[Exception],
    message: str,
) -> None:
    out = tmp_path / "out"
    base, model = str(llama_family.base), str(llama_family.finetunes[0])
    flags = ["--rank", "4"]
    if case == "rank 0":
        flags = ["--rank", "0"]
    elif case == "rank per module -1":
        flags += ["--rank-per-module", "q_proj=-1"]
    elif case == "shapes":
        model = str(odd_models["wide"])
    elif case == "architecture":
        model = str(odd_models["mistral"])
    elif case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "module to save":
        flags += ["--modules-to-save", "vision_tower"]
    elif case == "rank pattern":
        flags += ["--rank-per-module", "qproj=2"]
    elif case == "same model":
        model = base
    before = sorted(os.listdir(tmp_path))
    argv = [
        "extract-lora",
        "--base",
        base,
        "--model",
        model,
        *flags,
        "--no-progress",
        "--device",
        "cpu",
        str(out),
    ]
    assert mergebot_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == before  # no output, no leftover staging folder
    if case == "out not empty":
        assert os.listdir(out) == ["keep.txt"]
    # the library raises the same error type
    if case not in {"rank per module -1", "module to save", "rank pattern", "rank 0"}:
        with pytest.raises(error, match=message):
            extract_lora(base, model, out, ExtractOptions(rank=4, device="cpu"))


@pytest.mark.parametrize("fixture", ["llama_family_f32", "llama_family"])
def test_ours_is_no_worse_than_mergekit_extract_lora(
    request: pytest.FixtureRequest, tmp_path: Path, parity_report: Any, fixture: str
) -> None:
    """mergekit stores its factors in the model's dtype (bfloat16 rounds them), ours in float32."""
    family: Family = request.getfixturevalue(fixture)
    theirs = tmp_path / "mergekit"
    command = [sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", str(family.finetunes[0])]
    command += [
        "--base-model",
        str(family.base),
        "--out-path",
        str(theirs),
        "--max-rank",
        "4",
        "--device",
        "cpu",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = tmp_path / "ours"
    extract_lora(str(family.base), str(family.finetunes[0]), ours, ExtractOptions(rank=4, device="cpu"))
    base, finetune = load_tensors(family.base), load_tensors(family.finetunes[0])
    mine, mk = adapter_updates(ours), adapter_updates(theirs)
    assert mk and set(mk) <= set(mine)
    for name, update in mk.items():
        delta = finetune[name].double() - base[name].double()
        err_mk = float((delta - update).norm())
        err_ours = float((delta - mine[name]).norm())
        parity_report(f"extract-lora rank-4 error mergebot/mergekit ({fixture})", name, err_ours / err_mk)
        assert err_ours <= err_mk + 1e-5 * float(delta.norm()), f"{name}: {err_ours} > mergekit's {err_mk}"


def test_from_hub_repos_equals_from_folders(llama_family: Family, tmp_path: Path) -> None:
    """Hub repos (served by localhub) are read through the engine's Hub source, tensor by tensor."""
    from huggingface_hub import HfApi

    from localhub.testing import run_localhub

    token = "hf_alice_secret_token"
    with run_localhub(tmp_path / "hub") as hub:
        hub.add_user("alice", token)
        api = HfApi(endpoint=hub.endpoint, token=token)
        for name, path in (("base", llama_family.base), ("ft0", llama_family.finetunes[0])):
            api.create_repo(f"alice/{name}", private=True)
            api.upload_folder(repo_id=f"alice/{name}", folder_path=str(path))
        options = ExtractOptions(rank=3, device="cpu", hub_endpoint=hub.endpoint, hub_token=token)
        extract_lora("alice/base@main", "alice/ft0", tmp_path / "from-hub", options)
    extract_lora(str(llama_family.base), str(llama_family.finetunes[0]), tmp_path / "from-disk", options)
    weights = "adapter_model.safetensors"
    assert (tmp_path / "from-hub" / weights).read_bytes() == (tmp_path / "from-disk" / weights).read_bytes()
    card = (tmp_path / "from-hub" / "README.md").read_text()
    assert 'base_model: "alice/base"\n' in card  # the repo id, without the revision
    config = json.loads((tmp_path / "from-hub" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "alice/base" and config["revision"] == "main"


def test_weights_left_out_by_exclude_are_noted(llama_family: Family, tmp_path: Path) -> None:
    options = ExtractOptions(rank=2, exclude=(r"mlp\.",), include=(r"layers\.[01]\.",), device="cpu")
    result = extract_lora(str(llama_family.base), str(llama_family.finetunes[0]), tmp_path / "a", options)
    modules = {m.module for m in result.modules}
    assert modules == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    (note,) = [n for n in result.notes if "at the base's values" in n]
    # every MLP weight, the attention of layers 2-3, the norms, the embedding and the head
    assert note.startswith(f"{4 * 3 + 2 * 4 + (4 * 2 + 1) + 2} tensor(s) ")
