"""The bot's settings: the ONE place that reads the environment.

    HF_ENDPOINT        the Hub to talk to (default https://huggingface.co)
    HF_TOKEN           the bot account's token (write access to its own namespace)
    WEBHOOK_SECRET     the secret the Hub sends in ``X-Webhook-Secret``
    MERGEBOT_DATA      the state folder (job database, scratch space for merges); when unset or not
                       writable (a Space's disk has no /data), a cache folder of the user's, or the
                       system's temporary folder, with a warning: its state does not outlive the disk
    MERGEBOT_NAMESPACE the user or organisation where the bot publishes merges asked for in
                       discussions or without sign-in (default: the token's own user)
    MERGEBOT_DB_URL    optional SQLAlchemy URL for the job store (default: SQLite in MERGEBOT_DATA)
    MERGEBOT_MAX_MERGE_GB  cap on the size of one merged model, in GB (default 20; 0 or `none`: no cap)
    MERGEBOT_JOB_TIMEOUT_MINUTES  wall-clock limit of one job, in minutes (default 120; 0 or `none`: no limit)

Everything else is built from a :class:`Settings` value, so tests construct one directly.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from bot.errors import BotError

log = logging.getLogger(__name__)

# a Hub user or organisation name
_NAMESPACE = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$"
DEFAULT_MAX_MERGE_GB = 20
DEFAULT_JOB_TIMEOUT_MINUTES = 120.0


class SettingsError(BotError):
    """The environment does not describe a runnable bot."""


class Settings(BaseModel):
    """Everything that tunes a bot instance. Secrets are ``SecretStr``: their repr is ``'**********'``."""

    model_config = ConfigDict(frozen=True)

    hf_endpoint: str = "https://huggingface.co"
    hf_token: SecretStr
    webhook_secret: SecretStr
    data_dir: Path
    db_url: SecretStr | None = None  # may hold a database password
    # per-user limit on jobs waiting or running
    max_jobs_per_user: int = Field(default=3, gt=0)
    # jobs waiting or running for all of the Space's anonymous visitors together
    max_guest_jobs: int = Field(default=6, gt=0)
    # largest merged model, in bytes, one request may produce (None: no cap)
    max_merge_bytes: int | None = Field(default=DEFAULT_MAX_MERGE_GB * 1_000_000_000, gt=0)
    # wall-clock minutes one job may run before it fails (None: no limit)
    job_timeout_minutes: float | None = Field(default=DEFAULT_JOB_TIMEOUT_MINUTES, gt=0)
    # most slices one passthrough (or other sliced) recipe may stack
    max_slices: int = Field(default=16, gt=0)
    # largest evaluation data file one `evolve` request may name, in bytes
    max_evolve_data_bytes: int = Field(default=50_000_000, gt=0)
    # fewest seconds between two progress edits of the status comment (it moves at 25/50/75 %)
    progress_interval_s: float = Field(default=5.0, ge=0)
    # seconds between two polls of watched parents and unanswered discussions (0: no poll)
    poll_interval_s: float = Field(default=300.0, ge=0)
    # where the merge arithmetic runs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bytes per output shard
    shard_bytes: int = Field(default=2_000_000_000, gt=0)
    # how many generations of ancestors the card's lineage shows
    lineage_depth: int = Field(default=4, ge=0, le=10)
    # most search trials one `evolve` request may ask for
    max_evolve_trials: int = Field(default=50, gt=0)
    # the repo whose discussions the poll reads for missed requests (default: <bot>/requests)
    requests_repo: str | None = None
    # where merges asked for in discussions or without sign-in are published (default: the token's user)
    namespace: str | None = Field(default=None, pattern=_NAMESPACE)
    # most Hub reads one poll makes in discussions (requests repo and the bot's own repos)
    poll_max_calls: int = Field(default=50, gt=0)

    @property
    def database_url(self) -> str:
        """The job store's SQLAlchemy URL."""
        if self.db_url is not None:
            return self.db_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'mergebot.sqlite').resolve()}"

    @property
    def work_dir(self) -> Path:
        """Scratch space for merges in progress."""
        return self.data_dir / "work"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read the bot's environment variables (see the module docstring).

        Raises:
            SettingsError: a required variable is missing or a value is invalid (names the variable only).
        """
        env = os.environ if environ is None else environ
        missing = [k for k in ("HF_TOKEN", "WEBHOOK_SECRET") if not env.get(k)]
        if missing:
            raise SettingsError(f"Set {', '.join(missing)} in the environment to run the bot.")
        values: dict[str, object] = {
            "hf_endpoint": env.get("HF_ENDPOINT") or "https://huggingface.co",
            "hf_token": env["HF_TOKEN"],
            "webhook_secret": env["WEBHOOK_SECRET"],
            "data_dir": state_folder(env),
            "db_url": env.get("MERGEBOT_DB_URL") or None,
            "namespace": env.get("MERGEBOT_NAMESPACE") or None,
        }
        given, gb = _limit(env, "MERGEBOT_MAX_MERGE_GB", "a number of GB")
        if given:
            values["max_merge_bytes"] = None if gb is None else int(gb * 1e9)
        given, minutes = _limit(env, "MERGEBOT_JOB_TIMEOUT_MINUTES", "a number of minutes")
        if given:
            values["job_timeout_minutes"] = minutes
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            fields = sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})
            raise SettingsError(f"Invalid bot settings: {', '.join(fields)}") from None


# the variables whose values are secrets: never logged, never written into an export
SECRET_VARIABLES = ("HF_TOKEN", "WEBHOOK_SECRET", "MERGEBOT_DB_URL")


def secret_values(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The values of the :data:`SECRET_VARIABLES` that are set (to keep them out of files and logs)."""
    env = os.environ if environ is None else environ
    return tuple(env[k] for k in SECRET_VARIABLES if env.get(k))


class DeploySettings(BaseModel):
    """What deploying the bot needs (``mergebot space push``, ``mergebot bot setup``): no state folder."""

    model_config = ConfigDict(frozen=True)

    hf_endpoint: str = "https://huggingface.co"
    hf_token: SecretStr
    webhook_secret: SecretStr
    namespace: str | None = Field(default=None, pattern=_NAMESPACE)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DeploySettings:
        """Read HF_ENDPOINT, HF_TOKEN, WEBHOOK_SECRET and MERGEBOT_NAMESPACE.

        Raises:
            SettingsError: HF_TOKEN or WEBHOOK_SECRET is missing, or the namespace is invalid.
        """
        env = os.environ if environ is None else environ
        missing = [k for k in ("HF_TOKEN", "WEBHOOK_SECRET") if not env.get(k)]
        if missing:
            raise SettingsError(f"Set {', '.join(missing)} in the environment to deploy the bot.")
        try:
            return cls(
                hf_endpoint=env.get("HF_ENDPOINT") or "https://huggingface.co",
                hf_token=SecretStr(env["HF_TOKEN"]),
                webhook_secret=SecretStr(env["WEBHOOK_SECRET"]),
                namespace=env.get("MERGEBOT_NAMESPACE") or None,
            )
        except ValidationError:
            raise SettingsError(
                "Invalid bot settings: MERGEBOT_NAMESPACE is not a Hub user or organisation name"
            ) from None


def _writable(folder: Path) -> bool:
    """The folder exists or could be made, and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def state_folder(environ: Mapping[str, str]) -> Path:
    """The bot's state folder: ``MERGEBOT_DATA`` when it can be written, else a fallback that can.

    The fallbacks, in order: ``$XDG_CACHE_HOME/mergebot``, ``$HOME/.cache/mergebot``, then
    ``mergebot-<uid>`` in the system's temporary folder. A fallback is logged as a warning: what
    it holds is lost with the disk (a Space's disk is wiped on restart). Never raises: the last
    fallback is returned even when it is not writable, so the error comes from the first write.
    """
    candidates: list[tuple[str, Path]] = []
    if environ.get("MERGEBOT_DATA"):
        candidates.append(("MERGEBOT_DATA", Path(environ["MERGEBOT_DATA"])))
    if environ.get("XDG_CACHE_HOME"):
        candidates.append(("XDG_CACHE_HOME", Path(environ["XDG_CACHE_HOME"]) / "mergebot"))
    if environ.get("HOME"):
        candidates.append(("HOME", Path(environ["HOME"]) / ".cache" / "mergebot"))
    uid = os.getuid() if hasattr(os, "getuid") else 0
    candidates.append(("the temporary folder", Path(tempfile.gettempdir()) / f"mergebot-{uid}"))
    source, folder = next(((s, f) for s, f in candidates if _writable(f)), candidates[-1])
    if source != "MERGEBOT_DATA":
        why = "is not writable" if environ.get("MERGEBOT_DATA") else "is not set"
        log.warning(
            "MERGEBOT_DATA %s: keeping the job store and scratch space in %s (from %s); "
            "they are lost when this disk is wiped",
            why,
            folder,
            source,
        )
    return folder
def _limit(env: Mapping[str, str], name: str, what: str) -> tuple[bool, float | None]:
    """A limit from the environment: (whether it is set, the number; None for `0`/`none`: no limit).

    Raises:
        SettingsError: the value is not a finite number.
    """
    text = (env.get(name) or "").strip()
    if not text:
        return False, None
    if text.lower() == "none":
        return True, None
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"Invalid bot settings: {name} must be {what}, or 0 or `none` for no limit") from None
    if not math.isfinite(value) or value < 0:
        raise SettingsError(f"Invalid bot settings: {name} must be {what}, or 0 or `none` for no limit")
    return True, (None if value == 0 else value)
