"""Runs one job: preflight, merge (shards uploaded as they are written), card, one commit, report.

The status comment is ONE comment in the requester's discussion, edited as the job moves:
queued (with its place), running (percent, throttled), done (link) or failed (reason).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bot.cards import SearchHistory, build_context, render_card
from bot.credentials import Credentials
from bot.errors import (
    BotError,
    HubError,
    JobCancelled,
    JobInterrupted,
    JobTimedOut,
    LicenseRefused,
    PreflightError,
)
from bot.hub import Hub, Lineage, RepoFacts
from bot.jobs import SIGN_IN_EXPIRED, Job, JobStore
from bot.licenses import LicenseVerdict, ParentLicense, decide
from bot.rights import ANONYMOUS, Rights, check_rights
from bot.settings import Settings
from engine import (
    MergeConfig,
    MergeError,
    MergeOptions,
    OpenModels,
    audit_models,
    build_plan,
    load_recipe,
    parse_hub_reference,
    raise_for_audit,
    run_merge,
)

log = logging.getLogger(__name__)

# Assumed throughput for the time estimate: range reads from the Hub dominate a CPU merge.
READ_BYTES_PER_S = 50_000_000
MODEL_KEYS = ("model", "base_model", "tokenizer_source")


def job_marker(job_id: str) -> str:
    """The text a job's commit carries, so a restarted job finds its own push."""
    return f"mergebot-job: {job_id}"


@dataclass(frozen=True)
class Preflight:
    """Facts gathered before any tensor is read."""

    config: MergeConfig  # with every parent pinned to its commit
    facts: Mapping[str, RepoFacts]  # repo id -> facts at that commit, base first
    verdict: LicenseVerdict
    bytes_to_read: int
    bytes_to_write: int

    @property
    def seconds_estimate(self) -> float:
        return self.bytes_to_read / READ_BYTES_PER_S

    def summary(self) -> str:
        mb = self.bytes_to_write / 1e6
        return f"about {mb:.1f} MB to write, roughly {max(1, round(self.seconds_estimate))} s of merging"


def _walk_models(data: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(data, dict):
        return {
            k: (fn(v) if k in MODEL_KEYS and isinstance(v, str) and v != "base" else _walk_models(v, fn))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_walk_models(v, fn) for v in data]
    return data


def hub_repo(reference: str) -> tuple[str, str | None]:
    """The Hub repo and revision a recipe reference names.

    Raises:
        PreflightError: it is a local path, or not an ``org/name`` id (the bot reads only Hub repos).
    """
    parsed = parse_hub_reference(reference)
    if parsed is None or reference.startswith((".", "/", "~")) or os.path.exists(reference):
        raise PreflightError(
            f"`{reference}` is not a Hub repo id; the bot merges Hub repos (`org/name`) only."
        )
    return parsed


def preflight(
    hub: Hub,
    recipe: str | MergeConfig,
    *,
    accept_license: bool,
    name: str,
    endpoint: str,
    token: str,
    rights: Rights = ANONYMOUS,
    private: bool = False,
) -> Preflight:
    """Validate a recipe against the Hub: parents exist and agree, the requester may read them, licences allow the merge.

    Args:
        hub: the bot's Hub client.
        token: the bot's token (tensors are read with it only when every input is public).
        rights: the requester's (see :mod:`bot.rights`): facts are read, and judged, with them.
        private: whether the result is to be private.

    Raises:
        engine.RecipeError: the recipe is invalid. PreflightError: a parent cannot be read or
        the models disagree. AccessRefused: the requester's rights do not allow it.
        LicenseRefused: the licences forbid the merge.
    """
    config = recipe if isinstance(recipe, MergeConfig) else load_recipe(recipe)
    reader = rights.reader(hub)
    facts: dict[str, RepoFacts] = {}
    pins: dict[str, str] = {}
    for ref in config.referenced_models():
        repo_id, revision = hub_repo(ref)
        f = reader.repo_facts(repo_id, revision)
        previous = facts.get(repo_id)
        if previous is not None and previous.sha != f.sha:
            raise PreflightError(f"`{repo_id}` is named at two different revisions; use one.")
        facts[repo_id] = f
        pins[ref] = f"{repo_id}@{f.sha}"
    pinned_yaml = yaml.safe_dump(
        _walk_models(yaml.safe_load(config.to_yaml()), lambda ref: pins.get(ref, ref)), sort_keys=False
    )
    pinned = load_recipe(pinned_yaml)
    check_rights(facts.values(), rights, private=private)
    verdict = decide(
        [
            ParentLicense(f.repo_id, f.license, f.license_name, f.license_link, f.gated)
            for f in facts.values()
        ],
        accept_license=accept_license,
        model_name=name,
    )
    if not verdict.allowed:
        raise LicenseRefused(tuple(r for r in verdict.reasons))
    options = MergeOptions(hub_endpoint=endpoint, hub_token=rights.read_token(token), device="cpu")
    try:
        with OpenModels(pinned, options) as opened:
            metadata = opened.metadata()
            raise_for_audit(audit_models(pinned, metadata))
            plan = build_plan(pinned, metadata)
    except MergeError as exc:
        raise PreflightError(str(exc)) from None
    return Preflight(pinned, facts, verdict, plan.bytes_to_read, plan.bytes_to_write)


def commit_description(job: Job, pre: Preflight, what: str = "") -> str:
    """A result commit's description: who asked, the pinned parents, the job's marker."""
    parents = "\n".join(f"- {repo}@{f.sha}" for repo, f in pre.facts.items())
    marker = job_marker(job.id)
    return f"Requested by @{job.spec.requester}{what}.\n\nParents:\n{parents}\n\n{marker}"


class StatusComment:
    """The one comment a job edits as it moves; no-op for jobs with no discussion."""

    def __init__(self, hub: Hub, store: JobStore, job: Job, interval_s: float) -> None:
        self._hub = hub
        self._store = store
        self._job = job
        self._comment = job.status_comment
        self._interval = interval_s
        self._last = 0.0

    def show(self, text: str, *, force: bool = True) -> None:
        report = self._job.spec.report
        if report is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        try:
            if self._comment is None:
                self._comment = self._hub.comment(report.repo_id, report.num, text)
                self._store.set_status_comment(self._job.id, self._comment)
            else:
                self._hub.edit_comment(report.repo_id, report.num, self._comment, text)
        except BotError as exc:  # a report that cannot be written must not fail the merge
            log.warning("job %s: status comment not updated: %s", self._job.id, exc)
        except Exception as exc:  # e.g. the Hub unreachable: say what, not the request (no headers)
            log.warning("job %s: status comment not updated (%s)", self._job.id, type(exc).__name__)


def queued_text(job_id: str, position: int | None, summary: str = "") -> str:
    where = f" (position {position} in the queue)" if position else ""
    more = f"\n\nPreflight passed: {summary}." if summary else ""
    return f"⏳ Job `{job_id}` is queued{where}.{more}"


class Worker:
    """Runs jobs from the store, one call per job."""

    def __init__(
        self,
        settings: Settings,
        hub: Hub,
        store: JobStore,
        credentials: Credentials | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.store = store
        self.credentials = credentials if credentials is not None else Credentials()
        self.clock = clock  # seconds, for the per-job time limit
        self._stopping = threading.Event()
        self._deadline: float | None = None  # of the job running now (one at a time)

    def publisher(self, job: Job) -> Hub | None:
        """The Hub as whoever publishes ``job``: the bot, or the signed-in user (None: their token is gone)."""
        if job.spec.credential == "bot":
            return self.hub
        held = self.credentials.get(job.id)
        if held is None or held.user != job.spec.requester:
            return None
        return self.hub.as_user(held.token.get_secret_value())

    def rights(self, job: Job) -> Rights:
        """Whose rights ``job`` reads its inputs with: its signed-in requester's token, else an anonymous visitor's."""
        if job.spec.credential == "user":
            held = self.credentials.get(job.id)
            if held is not None and held.user == job.spec.requester:
                return Rights(held.token)
        return ANONYMOUS

    def stop(self) -> None:
        """Make a running merge stop at its next tensor; its job goes back to the queue."""
        self._stopping.set()

    def run(self, turn: str) -> None:
        """Take one turn of the executor: run the next queued job in fair order to its end. Never raises.

        ``turn`` is the job whose scheduling gave this turn; the job run is the one
        :meth:`bot.jobs.JobStore.next_fair` names, which may be another requester's.
        """
        job_id: str | None = turn
        try:
            job_id = self.store.claim_next()
            if job_id is not None:
                self._run_claimed(job_id)
        except Exception:  # the store itself failed: the job stays `running` and is re-queued on restart
            log.exception("job %s could not be run", job_id)

    def _run_claimed(self, job_id: str) -> None:
        self.refresh_positions()
        job = self.store.get(job_id)
        assert job is not None
        status = StatusComment(self.hub, self.store, job, self.settings.progress_interval_s)
        publisher = self.publisher(job)
        if publisher is None:  # a signed-in user's job whose token this process never had
            self.store.hold_for_sign_in(job.id)
            log.info("job %s waits for its requester to sign in again", job.id)
            return
        minutes = self.settings.job_timeout_minutes
        self._deadline = None if minutes is None else self.clock() + 60 * minutes
        # The comment is written before the state, so whoever sees a finished job also sees its report.
        try:
            commit = self._run(job, status, publisher)
        except JobInterrupted:
            status.show(f"⏸️ Job `{job.id}` was interrupted by a restart of the bot; it will start again.")
            self.store.requeue(job.id)
            return  # the process is stopping: its credentials go with it
        except JobCancelled:
            status.show(f"🛑 Job `{job.id}` was cancelled; nothing was published.")
            self.store.finish(job.id, "cancelled", reason="cancelled by the requester")
        except HubError as exc:
            if job.spec.credential == "user" and exc.status == 401:  # the user's token expired or was revoked
                self.store.hold_for_sign_in(job.id, SIGN_IN_EXPIRED)
            else:
                status.show(f"❌ Job `{job.id}` failed: {exc}\n\nNothing was published.")
                self.store.finish(job.id, "failed", reason=str(exc))
        except (BotError, MergeError) as exc:
            status.show(f"❌ Job `{job.id}` failed: {exc}\n\nNothing was published.")
            self.store.finish(job.id, "failed", reason=str(exc))
        except Exception:
            log.exception("job %s failed with an unexpected error", job.id)
            status.show(
                f"❌ Job `{job.id}` failed with an internal error; the bot's operator has the details."
            )
            self.store.finish(job.id, "failed", reason="internal error")
        else:
            url = self.hub.repo_url(job.spec.destination)
            status.show(
                f"✅ Job `{job.id}` is done: [{job.spec.destination}]({url}) (commit `{commit[:12]}`)."
            )
            self.store.finish(job.id, "succeeded", commit=commit)
        self.credentials.drop(job.id)

    def refresh_positions(self, limit: int = 20) -> None:
        """The queue moved: show each waiting job's new place in its status comment (the first ``limit``)."""
        for waiting in self.store.all(states=("queued",))[:limit]:
            if waiting.status_comment is not None:
                StatusComment(self.hub, self.store, waiting, 0).show(
                    queued_text(waiting.id, self.store.queue_position(waiting.id))
                )

    def checkpoint(self, job: Job) -> None:
        """Raise if the bot is stopping, the job was cancelled or ran out of time (called between units of work)."""
        if self._stopping.is_set():
            raise JobInterrupted(job.id)
        self.check_deadline(job)
        current = self.store.get(job.id)
        if current is not None and current.cancel_requested:
            raise JobCancelled(job.id)

    def check_deadline(self, job: Job) -> None:
        """Raise when the running job is past ``job_timeout_minutes``.

        Raises:
            bot.errors.JobTimedOut: it is (the job fails; nothing is published).
        """
        minutes = self.settings.job_timeout_minutes
        if minutes is not None and self._deadline is not None and self.clock() > self._deadline:
            raise JobTimedOut(job.id, minutes)

    def card(self, job: Job, pre: Preflight, lineage: Lineage, search: SearchHistory | None = None) -> bytes:
        """The model card of a job's result (a merge, or the best merge of a search)."""
        context = build_context(
            repo_id=job.spec.destination,
            requester=job.spec.requester,
            bot_name=self.hub.whoami(),
            hub_url=self.hub.endpoint,
            method=pre.config.merge_method,
            recipe_yaml=pre.config.to_yaml(),
            facts=pre.facts,
            lineage=lineage,
            verdict=pre.verdict,
            job_id=job.id,
            search=search,
        )
        return render_card(context).encode()

    def _run(self, job: Job, status: StatusComment, publisher: Hub) -> str:
        if self._stopping.is_set():
            raise JobInterrupted(job.id)
        spec = job.spec
        marker = job_marker(job.id)
        pushed = publisher.commit_with_marker(spec.destination, marker)
        if pushed is not None:  # a previous process pushed, then died before recording it
            log.info("job %s was already pushed as %s", job.id, pushed.oid)
            return pushed.oid
        if spec.kind == "evolve":
            from bot.evolve import run_evolve  # imports optuna and transformers: only for evolve jobs

            return run_evolve(self, job, status, publisher)
        status.show(f"⚙️ Job `{job.id}` is running: checking the parents…")
        rights = self.rights(job)
        token = rights.read_token(self.settings.hf_token.get_secret_value())
        name = spec.destination.split("/")[-1]
        pre = preflight(
            self.hub,
            spec.recipe_yaml,
            accept_license=spec.accept_license,
            name=name,
            endpoint=self.settings.hf_endpoint,
            token=token,
            rights=rights,
            private=spec.private,
        )
        lineage = self.hub.lineage(list(pre.facts), self.settings.lineage_depth)
        self.settings.work_dir.mkdir(parents=True, exist_ok=True)
        last_check = [0.0]

        def progress(done: int, total: int, _: str) -> None:
            if self._stopping.is_set():
                raise JobInterrupted(job.id)
            self.check_deadline(job)
            now = time.monotonic()
            if now - last_check[0] >= 0.5 or done == total:
                last_check[0] = now
                current = self.store.get(job.id)
                if current is not None and current.cancel_requested:
                    raise JobCancelled(job.id)
                self.store.set_progress(job.id, done / total)
            status.show(f"⚙️ Job `{job.id}` is running: {100 * done // total}% merged.", force=False)

        with (
            tempfile.TemporaryDirectory(prefix=f"job-{job.id}-", dir=self.settings.work_dir) as tmp,
            publisher.publication(spec.destination, private=spec.private, gated=pre.verdict.gated) as pub,
        ):
            out = Path(tmp) / "out"
            run_merge(
                pre.config,
                out,
                options=MergeOptions(
                    hub_endpoint=self.settings.hf_endpoint,
                    hub_token=token,
                    device=self.settings.device,
                    out_shard_size=self.settings.shard_bytes,
                ),
                progress=progress,
                on_shard=lambda path: pub.upload_now(os.path.basename(path), Path(path)),
            )
            staged = set(pub.staged)
            for file in sorted(out.iterdir()):
                if file.name not in staged and file.is_file():
                    pub.add(file.name, file)
            pub.add("README.md", self.card(job, pre, lineage))
            title = f"{'Re-merge' if spec.kind == 'remerge' else 'Merge'} {name} ({marker})"
            return pub.commit(title, commit_description(job, pre))
