"""Fixtures for localhub's integration tests: one server for the session, driven through huggingface_hub."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# huggingface_hub reads these when it is imported: set them before any test module imports it.
_HF_HOME = tempfile.mkdtemp(prefix="localhub-hf-home-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ.pop("HF_TOKEN", None)

import pytest  # noqa: E402
from huggingface_hub import HfApi, constants  # noqa: E402

from localhub.server import LocalHubServer  # noqa: E402
from localhub.testing import run_localhub  # noqa: E402

ALICE = "tok-alice-0123456789"
BOB = "tok-bob-0123456789"
CAROL_READ = "tok-carol-read-0123"


@pytest.fixture(scope="session", autouse=True)
def _hf_client_settings() -> Iterator[None]:
    """In case another package imported huggingface_hub first: the settings that matter, at call time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_CACHE", str(Path(_HF_HOME) / "hub"))
        yield


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHubServer]:
    """The shared server: small pages and multipart sizes so paging and multipart run on small files."""
    with run_localhub(
        tmp_path_factory.mktemp("hubdata"),
        tree_page_size=3,
        commits_page_size=2,
        multipart_threshold_bytes=2_000_000,
        multipart_chunk_bytes=800_000,
        webhook_retry_delays=(0.2, 0.2),
    ) as server:
        server.add_user("alice", ALICE, orgs=["acme"])
        server.add_user("bob", BOB)
        server.add_user("carol", CAROL_READ, orgs=["acme"], role="read")
        yield server


@pytest.fixture(scope="session")
def alice(hub: LocalHubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=ALICE)


@pytest.fixture(scope="session")
def bob(hub: LocalHubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=BOB)


@pytest.fixture(scope="session")
def anon(hub: LocalHubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=False)


@pytest.fixture
def repo_name() -> Callable[[str], str]:
    """Unique repo ids, so tests sharing the server never collide."""

    def make(namespace: str = "acme") -> str:
        return f"{namespace}/r-{uuid.uuid4().hex[:10]}"

    return make


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


@pytest.fixture(scope="session")
def carol(hub: LocalHubServer) -> HfApi:
    """A member of acme whose token is read-only."""
    return HfApi(endpoint=hub.endpoint, token=CAROL_READ)
