"""Start a localhub in-process for tests: ``with run_localhub(tmp_path) as hub: HfApi(endpoint=hub.endpoint)``.

Other packages' tests can also use the `localhub_server` fixture by adding
``pytest_plugins = ["localhub.testing"]`` to their conftest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from localhub.config import HubConfig
from localhub.db import Clock, utc_now
from localhub.server import LocalHubServer


@contextmanager
def run_localhub(
    data_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Clock = utc_now,
    **settings: Any,
) -> Iterator[LocalHubServer]:
    """Serve `data_dir` on a free port from a background thread; stop on exit.

    `settings` are `HubConfig` fields (e.g. ``max_upload_bytes=1024``) for tests of limits;
    `clock` is the hub's time (rate-limit windows, the webhooks' daily limit, dates).
    """
    server = LocalHubServer(HubConfig(data_dir=Path(data_dir), **settings), host=host, port=port, clock=clock)
    server.start()
    try:
        yield server
    finally:
        server.stop()


try:  # the fixture is offered only where pytest is installed
    import pytest

    @pytest.fixture
    def localhub_server(tmp_path: Path) -> Iterator[LocalHubServer]:
        """A fresh localhub on 127.0.0.1 for one test, with its data in `tmp_path`."""
        with run_localhub(tmp_path / "localhub") as server:
            yield server

except ImportError:  # pragma: no cover
    pass
