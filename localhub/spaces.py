"""A stand-in for a Space's runtime settings: its secrets, variables and requested hardware.

localhub runs no Space: it records what a client asked for, in memory for the life of the
server, so tests of a deployment can see the secrets it set and the hardware it requested.
Secret values are write-only over HTTP, as on the Hub.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from localhub.errors import BadRequest

_SECRET_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
FLAVORS = frozenset(
    {
        "cpu-basic",
        "cpu-upgrade",
        "t4-small",
        "t4-medium",
        "l4x1",
        "l4x4",
        "a10g-small",
        "a10g-large",
        "a100-large",
    }
)


class SpaceRuntimes:
    """Secrets and hardware requests per Space (``namespace/name``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, dict[str, str]] = {}
        self._variables: dict[str, dict[str, str]] = {}
        self._hardware: dict[str, str] = {}

    def set_secret(self, repo_id: str, key: Any, value: Any) -> None:
        """Set (or replace) one secret.

        Raises:
            BadRequest: the key is not an environment variable name, or the value is not a string.
        """
        _check(key, value)
        with self._lock:
            self._secrets.setdefault(repo_id, {})[key] = value

    def set_variable(self, repo_id: str, key: Any, value: Any) -> dict[str, Any]:
        """Set (or replace) one variable; returns all of them as the Hub lists them.

        Raises:
            BadRequest: as for :meth:`set_secret`.
        """
        _check(key, value)
        with self._lock:
            variables = self._variables.setdefault(repo_id, {})
            variables[key] = value
            return {k: {"value": v} for k, v in variables.items()}

    def variables(self, repo_id: str) -> dict[str, str]:
        """The Space's variables."""
        with self._lock:
            return dict(self._variables.get(repo_id, {}))

    def secrets(self, repo_id: str) -> dict[str, str]:
        """The Space's secrets, values included (for tests; the HTTP API never returns them)."""
        with self._lock:
            return dict(self._secrets.get(repo_id, {}))

    def request_hardware(self, repo_id: str, flavor: Any) -> dict[str, Any]:
        """Record a hardware request; returns the runtime as the Hub describes it.

        Raises:
            BadRequest: an unknown flavor.
        """
        if flavor not in FLAVORS:
            raise BadRequest(f"Unknown hardware flavor {flavor!r}; one of: {', '.join(sorted(FLAVORS))}.")
        with self._lock:
            self._hardware[repo_id] = flavor
        return self.runtime(repo_id)

    def runtime(self, repo_id: str) -> dict[str, Any]:
        """The Space's runtime, as ``GET /api/spaces/{id}/runtime`` shapes it (it never runs here)."""
        with self._lock:
            requested = self._hardware.get(repo_id)
        return {"stage": "NO_APP_FILE", "hardware": {"current": None, "requested": requested}}


def _check(key: Any, value: Any) -> None:
    if not isinstance(key, str) or not _SECRET_KEY.match(key):
        raise BadRequest("A key must be a name of letters, digits and underscores.")
    if not isinstance(value, str):
        raise BadRequest("A value must be a string.")
