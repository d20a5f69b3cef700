"""Verification of a written output: transformers on the meta device, and the CLI's --verify."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
import zoo

import engine.plan
from engine import MergeOptions, run_merge
from engine.cli import main
from engine.config import validate_recipe
from engine.errors import VerificationError
from engine.verify import check_loads
from engine.writer import INDEX_NAME


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ...]:
    arch = next(a for a in zoo.ZOO if a.name == "llama")
    return zoo.build_family(arch, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def merged(llama: tuple[Path, ...], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "out"
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in llama],
    }
    run_merge(validate_recipe(recipe), out, options=MergeOptions(device="cpu"))
    return out


def edited(folder: Path, to: Path, config: Mapping[str, Any] | None = None, drop: str | None = None) -> Path:
    shutil.copytree(folder, to)
    if config is not None:
        data = json.loads((to / "config.json").read_text())
        (to / "config.json").write_text(json.dumps({**data, **config}))
    if drop is not None:
        index = json.loads((to / INDEX_NAME).read_text())
        del index["weight_map"][drop]
        (to / INDEX_NAME).write_text(json.dumps(index))
    return to


def test_a_good_output_loads(merged: Path) -> None:
    assert check_loads(merged) is True


def test_a_config_deeper_than_the_tensors_is_refused(merged: Path, tmp_path: Path) -> None:
    folder = edited(merged, tmp_path / "deeper", config={"num_hidden_layers": 3})
    with pytest.raises(
        VerificationError, match=r"transformers expects \d+ tensors the output lacks: 'model\.layers\.2\."
    ):
        check_loads(folder)


def test_tensors_beyond_the_config_and_missing_ones_are_named(merged: Path, tmp_path: Path) -> None:
    folder = edited(merged, tmp_path / "shallower", config={"num_hidden_layers": 1}, drop="model.norm.weight")
    with pytest.raises(VerificationError) as caught:
        check_loads(folder)
    message = str(caught.value)
    assert "lacks: 'model.norm.weight'" in message
    assert "transformers does not expect: 'model.layers.1." in message
    assert "\n" not in message and "Traceback" not in message


def test_wrong_shapes_are_named(merged: Path) -> None:
    with pytest.raises(VerificationError, match=r"1 tensors have other shapes .*'model\.norm\.weight'"):
        check_loads(merged, {"model.norm.weight": (3,)})


def test_an_architecture_transformers_does_not_know_is_not_checked(merged: Path, tmp_path: Path) -> None:
    custom = {
        "model_type": "mergebot-custom",
        "architectures": ["CustomLM"],
        "auto_map": {"AutoModel": "m.CustomLM"},
    }
    assert check_loads(edited(merged, tmp_path / "custom", config=custom)) is False


def passthrough_recipe(llama: tuple[Path, ...], tmp_path: Path) -> Path:
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llama[1]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(llama[2]), "layer_range": [1, 2]}]},
        ],
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_verify_passes_a_good_merge(llama: tuple[Path, ...], tmp_path: Path) -> None:
    recipe = passthrough_recipe(llama, tmp_path)
    assert (
        main(["merge", str(recipe), str(tmp_path / "out"), "--verify", "--no-progress", "--device", "cpu"])
        == 0
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_a_failed_verification_is_one_line_and_writes_nothing(
    llama: tuple[Path, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the multimodal bug, reproduced: the stacked model's config keeps the old depth
    monkeypatch.setattr(engine.plan, "restack_config", lambda config, stack, layers: dict(config))
    recipe = passthrough_recipe(llama, tmp_path)
    code = main(["merge", str(recipe), str(tmp_path / "out"), "--verify", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: The merged model failed verification") and err.count("\n") == 1, err
    assert "`num_hidden_layers` says 2 layers, but 'model.layers' has layers [2]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]  # no output, no staging folder


def test_a_config_transformers_rejects_is_one_clear_error(merged: Path, tmp_path: Path) -> None:
    # the passthrough bug on Gemma 3 and Qwen2: `layer_types` left at another depth than the layers
    stale = {"layer_types": ["full_attention"] * 3}
    with pytest.raises(VerificationError, match=r"transformers cannot read config\.json: .*layer_types") as caught:
        check_loads(edited(merged, tmp_path / "stale", config=stale))
    assert "\n" not in str(caught.value)
