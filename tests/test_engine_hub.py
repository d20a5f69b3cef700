"""Merging straight from Hub repos (served by localhub): same bytes as local, only ranges fetched."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_models import Family

from engine import MergeOptions, ModelNotFoundError, load_recipe, run_merge
from engine.run import OpenModels
from localhub.server import LocalHubServer
from localhub.testing import run_localhub

TOKEN = "hf_alice_secret_token"


@pytest.fixture(scope="module")
def hub_with_family(
    tmp_path_factory: pytest.TempPathFactory, llama_family: Family
) -> Iterator[tuple[LocalHubServer, Family]]:
    from huggingface_hub import HfApi

    with run_localhub(tmp_path_factory.mktemp("hub")) as hub:
        hub.add_user("alice", TOKEN)
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        for name, path in (("base", llama_family.base), ("ft0", llama_family.finetunes[0])):
            api.create_repo(f"alice/{name}")
            api.upload_folder(repo_id=f"alice/{name}", folder_path=str(path))
        api.create_repo("alice/secret", private=True)
        api.upload_folder(repo_id="alice/secret", folder_path=str(llama_family.finetunes[1]))
        yield hub, llama_family


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")}


RECIPE = (
    "merge_method: ties\nbase_model: {base}\nmodels:\n"
    "  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.4, density: 0.8}}\n"
)


def test_hub_merge_equals_local_merge_and_uses_no_cache(
    hub_with_family: tuple[LocalHubServer, Family], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub, family = hub_with_family
    cache = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(cache))
    options = MergeOptions(hub_endpoint=hub.endpoint, hub_token=TOKEN)
    hub_recipe = load_recipe(RECIPE.format(base="alice/base", a="alice/ft0@main", b="alice/secret"))
    local_recipe = load_recipe(RECIPE.format(base=family.base, a=family.finetunes[0], b=family.finetunes[1]))
    run_merge(hub_recipe, tmp_path / "from-hub", options=options)
    run_merge(local_recipe, tmp_path / "from-disk")
    assert digests(tmp_path / "from-hub") == digests(tmp_path / "from-disk")
    assert (tmp_path / "from-hub" / "tokenizer.json").read_bytes() == (
        family.base / "tokenizer.json"
    ).read_bytes()
    cached = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert cached == []  # disk use is the output alone


def test_only_headers_are_fetched_to_plan_and_slices_fetch_only_their_layers(
    hub_with_family: tuple[LocalHubServer, Family],
) -> None:
    hub, family = hub_with_family
    options = MergeOptions(hub_endpoint=hub.endpoint, hub_token=TOKEN)
    weights = sum(p.stat().st_size for p in family.base.glob("*.safetensors"))
    recipe = load_recipe(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: alice/base\n        layer_range: [0, 1]\n"
    )
    with OpenModels(recipe, options) as opened:
        opened.metadata()
        source = opened.sources["alice/base"]
        after_headers = source.bytes_fetched  # type: ignore[attr-defined]
        assert after_headers < weights / 5
        from engine.plan import build_plan
        from engine.run import read_inputs, resolve_device

        plan = build_plan(recipe, opened.metadata())
        for task in plan.tasks:
            read_inputs(task, opened.sources, resolve_device("cpu"))
        fetched = source.bytes_fetched - after_headers  # type: ignore[attr-defined]
    assert fetched == sum(t.nbytes for t in plan.tasks)  # exactly the bytes of the tensors used
    assert fetched < weights / 2


def test_missing_and_private_repos_are_named(
    hub_with_family: tuple[LocalHubServer, Family], tmp_path: Path
) -> None:
    hub, _ = hub_with_family
    recipe = load_recipe(
        "merge_method: linear\nmodels:\n  - model: alice/nope\n    parameters: {weight: 1}\n"
    )
    with pytest.raises(ModelNotFoundError, match=r"alice/nope.*no such repo"):
        run_merge(recipe, tmp_path / "out", options=MergeOptions(hub_endpoint=hub.endpoint, hub_token=TOKEN))
    private = load_recipe(
        "merge_method: linear\nmodels:\n  - model: alice/secret\n    parameters: {weight: 1}\n"
    )
    with pytest.raises(ModelNotFoundError, match=r"alice/secret.*private") as info:
        run_merge(private, tmp_path / "out", options=MergeOptions(hub_endpoint=hub.endpoint))
    assert TOKEN not in str(info.value)
    revision = load_recipe(
        "merge_method: linear\nmodels:\n  - model: alice/base@v9\n    parameters: {weight: 1}\n"
    )
    with pytest.raises(ModelNotFoundError, match="no revision 'v9'"):
        run_merge(
            revision, tmp_path / "out", options=MergeOptions(hub_endpoint=hub.endpoint, hub_token=TOKEN)
        )
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []


def test_an_unreachable_hub_is_a_clear_error(tmp_path: Path) -> None:
    recipe = load_recipe(
        "merge_method: linear\nmodels:\n  - model: alice/base\n    parameters: {weight: 1}\n"
    )
    options = MergeOptions(hub_endpoint="http://127.0.0.1:9", hub_token=TOKEN)  # nothing listens on port 9
    with pytest.raises(ModelNotFoundError, match="could not be reached") as info:
        run_merge(recipe, tmp_path / "out", options=options)
    assert TOKEN not in str(info.value)
    assert not (tmp_path / "out").exists()
