"""Server settings: one frozen value built by the CLI or a test, never read from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024

# The requests a rate limit may be set on (the Hub limits these per account).
RateLimitedAction = Literal["comment", "edit", "commit", "whoami"]


class RateLimit(BaseModel):
    """At most `requests` of one action per account in each fixed window of `window_seconds`."""

    model_config = ConfigDict(frozen=True)

    requests: int = Field(gt=0)
    window_seconds: float = Field(gt=0)


class HubConfig(BaseModel):
    """Everything that tunes a localhub instance; defaults match the real Hub where it matters."""

    model_config = ConfigDict(frozen=True)

    data_dir: Path
    # Files above this are refused, whether inline (base64 in a commit) or through LFS.
    max_upload_bytes: int = Field(default=50 * 1024 * MiB, gt=0)
    # Files up to this size (and not binary) are committed inline as "regular" files, like the Hub's 10 MB rule.
    regular_file_max_bytes: int = Field(default=10 * 1000 * 1000, gt=0)
    # LFS uploads above this use the multipart transfer, in parts of `multipart_chunk_bytes`.
    multipart_threshold_bytes: int = Field(default=256 * MiB, gt=0)
    multipart_chunk_bytes: int = Field(default=128 * MiB, gt=0)
    upload_link_ttl_seconds: int = Field(default=3600, gt=0)
    tree_page_size: int = Field(default=1000, gt=0)
    commits_page_size: int = Field(default=50, gt=0)
    discussions_page_size: int = Field(default=50, gt=0)
    # Seconds to wait before each retry of a failed webhook delivery (so len+1 attempts in all).
    # The Hub never retries on its own (only a manual replay does), so neither does localhub by default.
    webhook_retry_delays: tuple[float, ...] = ()
    # Deliveries one webhook receives per rolling 24 hours; the rest are dropped, as on the Hub.
    webhook_daily_limit: int = Field(default=1000, gt=0)
    # Per-account limits answered with 429, Retry-After and RateLimit headers (none by default).
    rate_limits: dict[RateLimitedAction, RateLimit] = Field(default_factory=dict)
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    download_chunk_bytes: int = Field(default=1 * MiB, gt=0)
