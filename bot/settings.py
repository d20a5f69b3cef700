"""The bot's settings: the ONE place that reads the environment.

    HF_ENDPOINT        the Hub to talk to (default https://huggingface.co)
    HF_TOKEN           the bot account's token (write access to its own namespace)
    WEBHOOK_SECRET     the secret the Hub sends in ``X-Webhook-Secret``
    MERGEBOT_DATA      the state folder (job database, scratch space for merges)
    MERGEBOT_DB_URL    optional SQLAlchemy URL for the job store (default: SQLite in MERGEBOT_DATA)
    MERGEBOT_MAX_MERGE_GB  optional cap on the size of one merged model, in GB (default: none)

Everything else is built from a :class:`Settings` value, so tests construct one directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from bot.errors import BotError


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
    # largest merged model, in bytes, one request may produce (None: no cap)
    max_merge_bytes: int | None = Field(default=None, gt=0)
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
        missing = [k for k in ("HF_TOKEN", "WEBHOOK_SECRET", "MERGEBOT_DATA") if not env.get(k)]
        if missing:
            raise SettingsError(f"Set {', '.join(missing)} in the environment to run the bot.")
        values: dict[str, object] = {
            "hf_endpoint": env.get("HF_ENDPOINT") or "https://huggingface.co",
            "hf_token": env["HF_TOKEN"],
            "webhook_secret": env["WEBHOOK_SECRET"],
            "data_dir": Path(env["MERGEBOT_DATA"]),
            "db_url": env.get("MERGEBOT_DB_URL") or None,
        }
        if env.get("MERGEBOT_MAX_MERGE_GB"):
            try:
                values["max_merge_bytes"] = int(float(env["MERGEBOT_MAX_MERGE_GB"]) * 1e9)
            except ValueError:
                raise SettingsError(
                    "Invalid bot settings: MERGEBOT_MAX_MERGE_GB must be a number of GB"
                ) from None
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            fields = sorted({str(e["loc"][0]) for e in exc.errors() if e["loc"]})
            raise SettingsError(f"Invalid bot settings: {', '.join(fields)}") from None
