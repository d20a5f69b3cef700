"""Layer stacks from tensor names and config.json, at real depths, without building models.

Qwen2-VL-7B as stored on the Hub: 28 language layers under ``model.layers`` (the count at the
config's top level) and 32 vision blocks under ``visual.blocks`` (``vision_config.depth``). The
longest run of indices is the vision tower's; the language model's must still be the one planned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest

from engine.architecture import default_stack, find_stacks, layer_lists, parse_layer_name, restack_config
from engine.config import validate_recipe
from engine.errors import IncompatibleModelsError, VerificationError
from engine.plan import ModelMeta, build_plan
from engine.sources.base import TensorInfo
from engine.verify import check_plan, stack_problems

QWEN2_VL_7B: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "num_hidden_layers": 28,
    "max_window_layers": 28,
    "vision_config": {"depth": 32, "embed_dim": 1280},
}


def qwen2_vl_names() -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "visual.merger.mlp.0.weight"]
    names += [
        f"model.layers.{i}.{part}.weight" for i in range(28) for part in ("self_attn.q_proj", "mlp.up_proj")
    ]
    names += [f"visual.blocks.{i}.{part}.weight" for i in range(32) for part in ("attn.qkv", "mlp.fc1")]
    return names


def meta(reference: str, config: Mapping[str, Any], names: list[str]) -> ModelMeta:
    return ModelMeta(reference, config, {n: TensorInfo("F32", (2, 2), 16) for n in names})


def test_the_language_model_is_found_when_the_vision_tower_is_deeper() -> None:
    stacks = {s.prefix: s for s in find_stacks(QWEN2_VL_7B, qwen2_vl_names())}
    assert set(stacks) == {"model.layers", "visual.blocks"}
    language, vision = stacks["model.layers"], stacks["visual.blocks"]
    assert (language.role, language.count, language.section, language.count_key) == (
        "language",
        28,
        None,
        "num_hidden_layers",
    )
    assert (vision.role, vision.count, vision.section, vision.count_key) == (
        "vision",
        32,
        "vision_config",
        "depth",
    )
    assert default_stack(stacks.values()) == language


def test_transformers_5_names_and_text_config() -> None:
    config = {"text_config": {"num_hidden_layers": 2}, "vision_config": {"depth": 4}, "num_hidden_layers": 9}
    names = [f"model.language_model.layers.{i}.mlp.weight" for i in range(2)]
    names += [f"model.visual.blocks.{i}.mlp.weight" for i in range(4)]
    stack = default_stack(find_stacks(config, names))
    assert stack is not None
    assert (stack.prefix, stack.count, stack.section, stack.count_key) == (
        "model.language_model.layers",
        2,
        "text_config",
        "num_hidden_layers",
    )


def test_encoder_and_decoder_are_two_stacks_with_their_own_counts() -> None:
    # T5 nests a second index inside each block: the block is the first one
    parsed = parse_layer_name("encoder.block.1.layer.0.SelfAttention.q.weight")
    assert parsed is not None and (parsed.prefix, parsed.index) == ("encoder.block", 1)
    config = {"num_layers": 2, "num_decoder_layers": 3}
    names = [f"encoder.block.{i}.layer.0.w" for i in range(2)] + [
        f"decoder.block.{i}.layer.1.w" for i in range(3)
    ]
    stacks = {s.role: s for s in find_stacks(config, names)}
    assert (stacks["encoder"].count, stacks["encoder"].count_key) == (2, "num_layers")
    assert (stacks["decoder"].count, stacks["decoder"].count_key) == (3, "num_decoder_layers")
    assert default_stack(stacks.values()) == stacks["decoder"]


def test_layer_lists_tell_one_entry_per_layer_from_layer_indices() -> None:
    settings = {
        "layer_types": ["a", "b", "a", "b"],
        "no_rope_layers": [1, 1, 0, 1],
        "moe_layers": [1, 3],
        "mlp_only_layers": [],
        "full_attention_layers": [0, 1, 2, 3],  # every layer, as indices
        "eos_token_id": [1, 2, 3, 4],  # not about layers, whatever its length
    }
    assert layer_lists(settings, 4) == {
        "layer_types": "per_layer",
        "no_rope_layers": "per_layer",
        "moe_layers": "indices",
        "mlp_only_layers": "indices",
        "full_attention_layers": "indices",
    }


def test_restack_takes_each_layers_entries_from_its_source() -> None:
    a = {
        "text_config": {"num_hidden_layers": 2, "layer_types": ["a0", "a1"], "moe_layers": [1]},
        "vision_config": {},
    }
    b = {
        "text_config": {"num_hidden_layers": 2, "layer_types": ["b0", "b1"], "moe_layers": [0]},
        "vision_config": {},
    }
    names = [f"language_model.model.layers.{i}.w" for i in range(2)]
    stack = default_stack(find_stacks(a, names))
    assert stack is not None
    out = restack_config(a, stack, [(a, 0), (a, 1), (b, 0), (b, 1)])
    assert out["text_config"] == {
        "num_hidden_layers": 4,
        "layer_types": ["a0", "a1", "b0", "b1"],
        "moe_layers": [1, 2],
    }
    assert "num_hidden_layers" not in out and out["vision_config"] == {}
    assert a["text_config"]["num_hidden_layers"] == 2  # the donor's config is not changed
    # a top-level copy of the language model's settings follows; a different top-level value is not its copy
    both = {**a, "num_hidden_layers": 2, "layer_types": ["a0", "a1"], "moe_layers": [7]}
    out = restack_config(both, stack, [(a, 0), (a, 1), (a, 1)])
    assert (out["num_hidden_layers"], out["layer_types"], out["moe_layers"]) == (3, ["a0", "a1", "a1"], [7])
    short = {"text_config": {"num_hidden_layers": 2, "layer_types": ["b0"]}}
    with pytest.raises(
        IncompatibleModelsError, match=r"`layer_types` in a source model's config\.json has 1 entries"
    ):
        restack_config(a, stack, [(a, 0), (short, 1)])


@pytest.mark.parametrize("method", ["linear", "passthrough"])
def test_the_plan_keeps_every_vision_block_and_stacks_the_language_model(method: str) -> None:
    models = {m: meta(m, QWEN2_VL_7B, qwen2_vl_names()) for m in ("a", "b")}
    if method == "linear":
        recipe = {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models],
        }
    else:
        recipe = {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 20]}]},
                {"sources": [{"model": "b", "layer_range": [10, 28]}]},
            ],
        }
    config = validate_recipe(recipe)
    plan = build_plan(config, models)
    names = {task.name for task in plan.tasks}
    vision = {n for n in qwen2_vl_names() if n.startswith("visual.")}
    assert vision <= names  # all 32 blocks, merged (never stacked)
    layers = {p.index for n in names if (p := parse_layer_name(n)) and p.prefix == "model.layers"}
    depth = 28 if method == "linear" else 38
    assert layers == set(range(depth))
    assert plan.output_config["num_hidden_layers"] == depth
    assert plan.output_config["vision_config"] == QWEN2_VL_7B["vision_config"]
    assert plan.notes == (
        "layer numbers refer to 'model.layers' (language, 28 layers); "
        "merged whole, never stacked: 'visual.blocks' (vision, 32 layers)",
    )
    if method == "passthrough":
        sources = {t.inputs[0].model for t in plan.tasks if t.name.startswith("visual.")}
        assert sources == {"a"}  # the whole tower from one model
    check_plan(config, plan, models)


def test_check_plan_names_a_tensor_the_plan_lost() -> None:
    models = {m: meta(m, QWEN2_VL_7B, qwen2_vl_names()) for m in ("a", "b")}
    config = validate_recipe(
        {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1}} for m in models]}
    )
    plan = build_plan(config, models)
    broken = dataclasses.replace(
        plan, tasks=tuple(t for t in plan.tasks if not t.name.startswith("visual.blocks.31."))
    )
    with pytest.raises(
        VerificationError, match=r"2 tensors of 'a' are missing from the output: 'visual\.blocks\.31\."
    ):
        check_plan(config, broken, models)


def test_stack_problems_name_a_list_left_at_the_old_depth() -> None:
    donor_config = {"text_config": {"num_hidden_layers": 2, "no_rope_layers": [1, 0], "moe_layers": [1]}}
    donor = meta("a", donor_config, [f"language_model.model.layers.{i}.w" for i in range(2)])
    out_names = [f"language_model.model.layers.{i}.w" for i in range(3)]
    good = {"text_config": {"num_hidden_layers": 3, "no_rope_layers": [1, 0, 0], "moe_layers": [1, 2]}}
    assert stack_problems(good, out_names, donor) == []
    stale = {"text_config": {"num_hidden_layers": 3, "no_rope_layers": [1, 0], "moe_layers": [1, 3]}}
    problems = stack_problems(stale, out_names, donor)
    assert any("text_config.no_rope_layers` has 2 entries for 3 layers" in p for p in problems), problems
    assert any("text_config.moe_layers` names layers outside 0..2" in p for p in problems), problems
    top_level = {"text_config": {"num_hidden_layers": 2}, "num_hidden_layers": 3}  # the bug
    assert any("layers [2]" in p for p in stack_problems(top_level, out_names, donor))


def test_a_gradient_runs_along_each_stacks_own_depth() -> None:
    models = {m: meta(m, QWEN2_VL_7B, qwen2_vl_names()) for m in ("a", "b")}
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": "a", "parameters": {"weight": [0.0, 1.0]}},
            {"model": "b", "parameters": {"weight": 1.0}},
        ],
    }
    plan = build_plan(validate_recipe(recipe), models)
    weight = {t.name: t.input_params[0]["weight"] for t in plan.tasks}
    assert weight["model.layers.27.mlp.up_proj.weight"] == pytest.approx(1.0)
    assert weight["model.layers.9.mlp.up_proj.weight"] == pytest.approx(9 / 27)
    assert weight["visual.blocks.31.mlp.fc1.weight"] == pytest.approx(1.0)  # not 31/27, nor left out
    assert weight["visual.blocks.9.mlp.fc1.weight"] == pytest.approx(9 / 31)
    assert weight["model.embed_tokens.weight"] == weight["visual.merger.mlp.0.weight"] == 0.0
