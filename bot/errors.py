"""Errors of the bot, as one tree. Anything else escaping a bot module is a bug.

    BotError                    base: ``str()`` is a message for the person who asked
    ├── CommandError            the discussion text could not be understood (comes with usage help)
    ├── LicenseRefused          the parents' licenses forbid the merge, or need ``--accept-license``
    ├── PreflightError          the parents cannot be read or merged (names the model and the reason)
    │   └── AccessRefused       an input is beyond the requester's rights, or the result would outlive them
    ├── QuotaError              the requester already has too many jobs waiting
    ├── TooLargeError           the merged model would exceed the bot's size limit
    ├── QualityCheckFailed      the merged model failed its quality check (published only with ``--force``)
    ├── DestinationError        the result repo cannot be created (exists, bad name)
    ├── JobNotFound             `cancel`/`status` named a job that does not exist or is not theirs
    ├── JobCancelled            raised inside a running merge when its job is cancelled
    ├── JobInterrupted          raised inside a running merge when the bot shuts down (the job is re-queued)
    ├── JobTimedOut             raised inside a running merge when it runs past the bot's time limit
    └── HubError                the Hub failed in a way the user cannot fix (status code, no body)

Engine errors (``engine.MergeError``) are shown unchanged: they are written for users too.
Messages never contain tokens: errors are built from fields, never from HTTP responses or headers.
"""

from __future__ import annotations


class BotError(Exception):
    """Base of every error the bot reports in a discussion; ``str()`` is the whole message."""


class CommandError(BotError):
    """The comment was addressed to the bot but could not be understood."""


class LicenseRefused(BotError):
    def __init__(self, reasons: tuple[str, ...]) -> None:
        self.reasons = reasons
        super().__init__(
            "The merge was refused for license reasons:\n" + "\n".join(f"- {r}" for r in reasons)
        )


class PreflightError(BotError):
    pass


class AccessRefused(PreflightError):
    """The request reads what its requester could not read, or would publish it more widely."""

    def __init__(self, reasons: tuple[str, ...]) -> None:
        self.reasons = reasons
        super().__init__("\n".join(reasons))
class QualityCheckFailed(BotError):
    """The merge failed :func:`engine.quality.check_quality`; ``table`` is the report's markdown."""

    def __init__(self, reasons: tuple[str, ...], table: str) -> None:
        self.reasons = reasons
        self.table = table
        super().__init__(
            "the merged model failed its quality check, so it was not published:\n"
            + "\n".join(f"- {r}" for r in reasons)
            + f"\n\n{table}\n\nTo publish it anyway, ask again with `--force`."
        )


class TooLargeError(BotError):
    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"The merged model would be {size / 1e9:.1f} GB, above this bot's limit of {limit / 1e9:.1f} GB. "
            "Merge smaller models, or run the same recipe yourself with `mergebot merge`."
        )


class QuotaError(BotError):
    def __init__(self, user: str, limit: int, *, guests: bool = False) -> None:
        self.user = user
        self.limit = limit
        if guests:
            super().__init__(
                f"Visitors who are not signed in already have {limit} merge(s) waiting between them; "
                "wait for one to finish, or sign in with Hugging Face to use your own quota."
            )
            return
        super().__init__(
            f"@{user} already has {limit} merge(s) waiting; wait for one to finish or cancel one "
            "(`cancel <job>`) before asking for another."
        )


class DestinationError(BotError):
    pass


class JobNotFound(BotError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"No job `{job_id}` of yours was found; `status` lists your jobs.")


class JobCancelled(BotError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"Job `{job_id}` was cancelled.")


class JobInterrupted(BotError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"Job `{job_id}` was interrupted by a restart of the bot; it will run again.")


class JobTimedOut(BotError):
    def __init__(self, job_id: str, minutes: float) -> None:
        self.job_id = job_id
        self.minutes = minutes
        super().__init__(
            f"Job `{job_id}` ran past this bot's limit of {minutes:g} minutes per job and was stopped. "
            "Ask for a smaller merge or search, or run it yourself with `mergebot`."
        )


class HubError(BotError):
    def __init__(self, action: str, status: int | None = None, tries: int = 1) -> None:
        self.action = action
        self.status = status
        self.tries = tries
        code = f"HTTP {status}" if status is not None else ""
        times = f"{tries} tries" if tries > 1 else ""
        detail = f" ({', '.join(x for x in (code, times) if x)})" if code or times else ""
        super().__init__(f"The Hub failed while {action}{detail}; the bot will not retry this step.")
