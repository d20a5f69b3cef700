"""``modules:`` recipes merge each module of a vision-language model its own way, as mergekit does.

The models are tiny Mistral 3 checkpoints (a text decoder, a Pixtral vision tower and a
projector): their config comes from transformers, their tensor names from mergekit's own
architecture table (so mergekit, the oracle, can merge them), their values from seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import load_tensors, recipe_yaml, run_mergekit
from safetensors.torch import save_file
from tiny_models import VOCAB_SIZE, build_tokenizer

from engine import MergeOptions, load_recipe, run_merge
from engine.errors import RecipeError
from engine.modules import module_of
from engine.run import plan_merge

TEXT_LAYERS, VISION_LAYERS = 3, 2


def build_tiny_vlm(folder: Path, seed: int) -> str:
    """A Mistral3ForConditionalGeneration folder with random bf16 tensors; returns its path."""
    from mergekit.architecture import arch_info_for_config
    from mergekit.architecture.base import ConfiguredModelArchitecture
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    vision = PixtralVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=2,
        head_dim=8,
        image_size=32,
        patch_size=8,
    )
    config = Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict())
    config.architectures = ["Mistral3ForConditionalGeneration"]
    config.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    architecture = ConfiguredModelArchitecture(info=arch_info_for_config(config), config=config)
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        w.name: (4,)
        if w.name.endswith("norm.weight")
        else (VOCAB_SIZE, 4)
        if w.vocabulary_axis is not None  # embeddings and output head: one row per token
        else (3, 4)
        for w in architecture.all_weights()
    }
    tensors = {
        name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in shapes.items()
    }
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def vlms(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    root = tmp_path_factory.mktemp("vlm")
    a, b, c = (build_tiny_vlm(root / name, seed) for seed, name in enumerate("abc"))
    return a, b, c


def modules_recipe(a: str, b: str, c: str) -> dict[str, Any]:
    """Text layers stacked from two slices, the vision tower and projector merged whole, each its own t."""
    return {
        "merge_method": "slerp",
        "base_model": a,
        "modules": {
            "text_decoder": {
                "slices": [
                    {
                        "sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}],
                        "parameters": {"t": [0, 1]},
                    },
                    {"sources": [{"model": a, "layer_range": [1, 3]}, {"model": c, "layer_range": [1, 3]}]},
                ],
                # only attention: the rest falls through to the recipe's t
                "parameters": {"t": {"filter": "self_attn", "value": 0.2}},
            },
            "vision_tower": {"models": [{"model": a}, {"model": b}], "parameters": {"t": 0.7}},
            "multi_modal_projector": {"models": [{"model": a}, {"model": c}]},
        },
        "parameters": {"t": 0.5},
        "embed_slerp": True,
    }


@pytest.mark.parametrize("tokenizer_source", [None, "union"])
def test_modules_recipe_merges_as_mergekit_does(
    vlms: tuple[str, str, str], tmp_path: Path, tokenizer_source: str | None
) -> None:
    recipe = modules_recipe(*vlms)
    if tokenizer_source is not None:  # the vocabulary is built for the text decoder's tensors
        recipe["tokenizer_source"] = tokenizer_source
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    ours = tmp_path / "mergebot"
    run_merge(load_recipe(recipe_yaml(recipe)), ours, options=MergeOptions(seed=42))
    want, got = load_tensors(theirs), load_tensors(ours)
    assert sorted(got) == sorted(want)
    assert any(".layers.3." in name for name in got)  # four text layers from two slices of two
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, different[:5]
    config = json.loads((ours / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4
    assert config["vision_config"]["num_hidden_layers"] == VISION_LAYERS
    assert json.loads((theirs / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4


def test_each_module_takes_its_own_parameters(vlms: tuple[str, str, str]) -> None:
    a, b, c = vlms
    plan = plan_merge(load_recipe(recipe_yaml(modules_recipe(a, b, c))))
    t = {task.name: task.params["t"] for task in plan.tasks}
    assert t["vision_tower.ln_pre.weight"] == 0.7
    assert t["multi_modal_projector.linear_1.weight"] == 0.5
    # the first slice's gradient (above the module's), at its end
    assert t["language_model.model.layers.1.self_attn.q_proj.weight"] == 1.0
    assert t["language_model.model.layers.2.self_attn.q_proj.weight"] == 0.2  # the module's
    assert t["language_model.model.layers.2.mlp.up_proj.weight"] == 0.5  # the recipe's, beneath the module's
    inputs = {task.name: [i.model for i in task.inputs] for task in plan.tasks}
    assert inputs["multi_modal_projector.linear_1.weight"] == [a, c]
    assert inputs["language_model.model.layers.3.mlp.up_proj.weight"] == [a, c]
    assert any("field 'embed_slerp' has no effect" in note for note in plan.notes)


def test_a_module_left_out_is_refused(vlms: tuple[str, str, str]) -> None:
    a, b, _ = vlms
    recipe = {
        "merge_method": "slerp",
        "base_model": a,
        "modules": {"text_decoder": {"models": [{"model": a}, {"model": b}]}},
        "parameters": {"t": 0.5},
    }
    with pytest.raises(
        RecipeError, match=r"leaves out: .*'vision_tower' \(\d+ tensors, e\.g\. 'vision_tower\."
    ):
        plan_merge(load_recipe(recipe_yaml(recipe)))


def test_cli_prints_the_notes(
    vlms: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    a, b, c = vlms
    recipe = modules_recipe(a, b, c)
    recipe["modules"]["vision_tower"]["parameters"]["nomalize"] = True
    path = tmp_path / "recipe.yml"
    path.write_text(recipe_yaml(recipe))
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: modules.vision_tower.parameters.nomalize (line" in out
    assert "parameter 'nomalize' has no effect (slerp takes: t)" in out
    assert "note: embed_slerp (line" in out
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok: the models are compatible" in out and "parameter 'nomalize' has no effect" in out


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("language_model.model.layers.0.mlp.up_proj.weight", "text_decoder"),
        ("language_model.lm_head.weight", "text_decoder"),
        ("model.language_model.embed_tokens.weight", "text_decoder"),
        ("lm_head.weight", "text_decoder"),
        ("model.layers.3.self_attn.q_proj.weight", "text_decoder"),
        ("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision_tower"),
        ("model.vision_tower.transformer.layers.1.attention.q_proj.weight", "vision_tower"),
        ("visual.blocks.0.attn.qkv.weight", "vision_tower"),
        ("vision_model.model.layers.0.mlp.fc1.weight", "vision_model"),
        ("multi_modal_projector.linear_1.weight", "multi_modal_projector"),
        ("model.multi_modal_projector.mm_soft_emb_norm.weight", "multi_modal_projector"),
        ("visual.merger.mlp.0.weight", "multi_modal_projector"),  # inside visual., the longer prefix wins
        ("model.visual.deepstack_merger_list.0.norm.weight", "multi_modal_projector"),
    ],
)
def test_tensors_belong_to_modules_by_prefix(name: str, module: str) -> None:
    assert module_of(name) == module
