"""Repos, accounts and access rules, through huggingface_hub only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from localhub.server import LocalHubServer

CARD = """---
license: apache-2.0
library_name: transformers
tags: [merge, mergekit]
base_model:
- org-a/base-one
- org-b/base-two
base_model_relation: merge
---
# A merged model
"""


def test_whoami_has_the_fields_the_client_reads(alice: HfApi) -> None:
    me = alice.whoami()
    assert me["name"] == "alice"
    assert me["type"] == "user"
    assert [org["name"] for org in me["orgs"]] == ["acme"]
    assert me["auth"]["accessToken"]["role"] == "write"


def test_whoami_with_a_wrong_token_is_401(hub: LocalHubServer) -> None:
    with pytest.raises(HfHubHTTPError, match="Invalid user token") as err:
        HfApi(endpoint=hub.endpoint, token="not-a-token").whoami()
    assert err.value.response.status_code == 401


def test_create_conflict_and_exist_ok(alice: HfApi, repo_name: Callable[[str], str]) -> None:
    repo_id = repo_name("acme")
    url = alice.create_repo(repo_id)
    assert url.repo_id == repo_id and url.endpoint == alice.endpoint
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_repo(repo_id)
    assert err.value.response.status_code == 409
    assert err.value.response.json()["url"].endswith(f"/{repo_id}")
    assert alice.create_repo(repo_id, exist_ok=True).repo_id == repo_id


def test_create_in_own_namespace_without_slash(alice: HfApi) -> None:
    url = alice.create_repo("no-namespace-given", exist_ok=True)
    assert url.repo_id == "alice/no-namespace-given"


def test_model_info_reads_the_card(alice: HfApi, repo_name: Callable[[str], str]) -> None:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=CARD.encode(), path_in_repo="README.md", repo_id=repo_id)
    info = alice.model_info(repo_id, files_metadata=True)
    assert info.id == repo_id and info.author == "acme"
    assert info.private is False and info.gated is False
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert info.card_data.base_model == ["org-a/base-one", "org-b/base-two"]
    assert {
        "base_model:org-a/base-one",
        "base_model:merge:org-a/base-one",
        "base_model:merge:org-b/base-two",
    } <= set(info.tags or [])
    assert {"merge", "transformers", "license:apache-2.0"} <= set(info.tags or [])
    assert info.library_name == "transformers"
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {".gitattributes", "README.md"}
    assert siblings["README.md"].size == len(CARD.encode())
    raw = alice.model_info(repo_id)
    assert raw.siblings is not None and raw.siblings[0].size is None  # sizes only when asked
    assert info.last_modified is not None and info.created_at is not None
    assert info.sha is not None and len(info.sha) == 40


def test_dates_end_in_z(alice: HfApi, repo_name: Callable[[str], str]) -> None:
    from huggingface_hub.utils import get_session

    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    data = get_session().get(f"{alice.endpoint}/api/models/{repo_id}").json()
    assert data["lastModified"].endswith("Z") and data["createdAt"].endswith("Z")


def test_info_at_a_revision(alice: HfApi, repo_name: Callable[[str], str]) -> None:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    first = alice.model_info(repo_id).sha
    alice.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=repo_id)
    old = alice.model_info(repo_id, revision=first)
    assert old.sha == first and [s.rfilename for s in old.siblings or []] == [".gitattributes"]
    assert alice.model_info(repo_id, revision=first[:8]).sha == first
    with pytest.raises(RevisionNotFoundError):
        alice.model_info(repo_id, revision="no-such-branch")


def test_datasets_and_spaces(alice: HfApi, repo_name: Callable[[str], str]) -> None:
    ds = repo_name("acme")
    alice.create_repo(ds, repo_type="dataset")
    alice.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=ds, repo_type="dataset")
    assert [s.rfilename for s in alice.dataset_info(ds).siblings or []] == [".gitattributes", "data.csv"]
    space = repo_name("acme")
    alice.create_repo(space, repo_type="space", space_sdk="gradio")
    info = alice.space_info(space)
    assert info.sdk == "gradio"
    assert alice.repo_exists(space, repo_type="space")
    assert not alice.repo_exists(space)  # a model of that name does not exist


def test_delete_repo(alice: HfApi, repo_name: Callable[[str], str]) -> None:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    alice.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        alice.delete_repo(repo_id)
    alice.delete_repo(repo_id, missing_ok=True)


def test_missing_repo(alice: HfApi) -> None:
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("acme/does-not-exist")
    assert not alice.repo_exists("acme/does-not-exist")


def test_foreign_namespace_is_403(bob: HfApi, alice: HfApi, repo_name: Callable[[str], str]) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo(repo_name("acme"))
    assert err.value.response.status_code == 403
    assert "namespace 'acme'" in str(err.value)
    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        bob.delete_repo(repo_id)
    assert err.value.response.status_code == 403


def test_read_only_token_cannot_write(carol: HfApi, repo_name: Callable[[str], str]) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        carol.create_repo(repo_name("acme"))
    assert err.value.response.status_code == 403


def test_anonymous_write_is_401(anon: HfApi, repo_name: Callable[[str], str]) -> None:
    with pytest.raises(HfHubHTTPError) as err:
        anon.create_repo(repo_name("acme"))
    assert err.value.response.status_code == 401


def test_wrong_token_on_reads_is_401(
    hub: LocalHubServer, alice: HfApi, repo_name: Callable[[str], str]
) -> None:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="wrong").model_info(repo_id)
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)


def test_private_repo_is_invisible_to_others(
    alice: HfApi, bob: HfApi, anon: HfApi, repo_name: Callable[[str], str], tmp_path: object
) -> None:
    repo_id = repo_name("acme")
    alice.create_repo(repo_id, private=True)
    alice.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id)
    assert alice.model_info(repo_id).private is True
    for other in (bob, anon):
        with pytest.raises(RepositoryNotFoundError):
            other.model_info(repo_id)
        with pytest.raises(RepositoryNotFoundError):
            other.list_repo_files(repo_id)
        assert not other.file_exists(repo_id, "s.txt")
    with pytest.raises(RepositoryNotFoundError):  # writing to an invisible repo: not found, not forbidden
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)


def test_settings_visibility_and_gating(
    alice: HfApi, bob: HfApi, repo_name: Callable[[str], str], cache_dir: object
) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    repo_id = repo_name("acme")
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"gated", path_in_repo="g.txt", repo_id=repo_id)
    alice.update_repo_settings(repo_id, gated="manual")
    assert bob.model_info(repo_id).gated == "manual"
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "g.txt", endpoint=bob.endpoint, token=bob.token, cache_dir=cache_dir)
    path = hf_hub_download(repo_id, "g.txt", endpoint=alice.endpoint, token=alice.token, cache_dir=cache_dir)
    assert Path(path).read_bytes() == b"gated"
    alice.update_repo_settings(repo_id, private=True)
    with pytest.raises(RepositoryNotFoundError):
        bob.model_info(repo_id)
    with pytest.raises(HfHubHTTPError) as err:
        bob.update_repo_settings(repo_name("acme"), private=False)
    assert err.value.response.status_code == 404
