"""mergekit as an oracle: run it in-process on a recipe, and read any model folder back.

Why in-process rather than the ``mergekit-yaml`` CLI: one import for the whole
session instead of ~6 s of start-up per recipe. mergekit is only ever imported
here and only by tests; mergebot itself never depends on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

Recipe = str | Mapping[str, Any]


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """A recipe as a plain dict, whether given as YAML text or as a mapping."""
    if isinstance(recipe, str):
        loaded = yaml.safe_load(recipe)
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe YAML must be a mapping, got {type(loaded).__name__}")
        return loaded
    return json.loads(json.dumps(recipe))  # deep copy; also rejects non-JSON values early


def recipe_yaml(recipe: Recipe) -> str:
    """A recipe as YAML text (what a user would paste), whether given as text or mapping."""
    if isinstance(recipe, str):
        return recipe
    return yaml.safe_dump(recipe_dict(recipe), sort_keys=False)


def run_mergekit(recipe: Recipe, out_dir: Path, *, seed: int | None = 42) -> Path:
    """Merge ``recipe`` with mergekit into ``out_dir`` and return ``out_dir``.

    Args:
        recipe: mergekit YAML text or the equivalent mapping; model paths must be local folders.
        out_dir: output folder (created).
        seed: passed as ``random_seed`` (mergekit seeds torch's global RNG with it, which is
            what makes its DARE masks reproducible).

    Returns:
        ``out_dir``.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe_dict(recipe))
    options = MergeOptions(
        random_seed=seed,
        device="cpu",
        quiet=True,
        copy_tokenizer=True,
        write_model_card=True,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    run_merge(config, str(out_dir), options=options, config_source=recipe_yaml(recipe))
    return out_dir


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the index's shards, or the single file."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as fp:
            weight_map: dict[str, str] = json.load(fp)["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {folder}")
    return files


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (sharded or not), in their stored dtype.

    Raises:
        ValueError: a tensor name appears in two shards, or the index names a tensor
            that its shard lacks (both are broken checkpoints, not test noise).
    """
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if name in tensors:
                    raise ValueError(f"tensor {name} appears in more than one shard of {folder}")
                tensors[name] = f.get_tensor(name)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as fp:
            indexed = set(json.load(fp)["weight_map"])
        if indexed != set(tensors):
            raise ValueError(
                f"index of {folder} disagrees with its shards: "
                f"only in index {sorted(indexed - set(tensors))}, only in shards {sorted(set(tensors) - indexed)}"
            )
    return tensors


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict (config.json, generation_config.json, ...)."""
    with open(path, encoding="utf-8") as fp:
        data: dict[str, Any] = json.load(fp)
    return data
