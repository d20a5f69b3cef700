"""Runs one job: preflight, merge (shards uploaded as they are written), quality check, card, one
commit, report. A merge that fails its quality check (:mod:`engine.quality`) is not published
unless the request said ``--force``; the check's table goes into the card and the last comment.

The status comment is ONE comment in the requester's discussion, edited at the job's milestones
(see :mod:`bot.budget`: at most 10 writes a job): queued (with its place), started, 25/50/75 %,
publishing, done (link) or failed (reason).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bot.budget import PROGRESS_MILESTONES, CommentBudget
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
    QualityCheckFailed,
)
from bot.hub import Hub, Lineage, RepoFacts, is_repo_id, is_revision
from bot.jobs import SIGN_IN_EXPIRED, Job, JobStore
from bot.licenses import LicenseVerdict, ParentLicense, decide
from bot.markdown import code_block, code_span, quiet_mentions
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
from engine.anatomy import PLOT_NAME
from engine.quality import QualityOptions, QualityReport, check_quality

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
    notes: tuple[str, ...] = ()  # what the recipe sets to no effect (see engine.MergeConfig.notes)

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
    if (
        parsed is None
        or reference.startswith((".", "/", "~"))
        or not is_repo_id(parsed[0])
        or (parsed[1] is not None and not is_revision(parsed[1]))
    ):
        # Syntax only: the text is never looked up on the bot's own disk, so the answer is
        # the same whether or not such a path exists there.
        raise PreflightError(
            f"{code_span(reference)} is not a Hub repo id; the bot merges Hub repos "
            "(`org/name`, optionally `@revision`) only."
        )
    return parsed


def pinned_recipe(config: MergeConfig, facts: Mapping[str, RepoFacts]) -> MergeConfig:
    """The recipe with each model written ``org/name@sha``, the commit in ``facts`` (keyed by repo id).

    A pinned reference is read from the Hub at that commit, never from a folder of the same
    name on the bot's disk.

    Raises:
        PreflightError: a reference is not a Hub repo id.
        KeyError: ``facts`` lacks one of the recipe's repos.
    """
    pins = {ref: f"{hub_repo(ref)[0]}@{facts[hub_repo(ref)[0]].sha}" for ref in config.referenced_models()}
    pinned_yaml = yaml.safe_dump(
        _walk_models(yaml.safe_load(config.to_yaml()), lambda ref: pins.get(ref, ref)), sort_keys=False
    )
    return load_recipe(pinned_yaml)


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
    for ref in config.referenced_models():
        repo_id, revision = hub_repo(ref)
        f = reader.repo_facts(repo_id, revision)
        previous = facts.get(repo_id)
        if previous is not None and previous.sha != f.sha:
            raise PreflightError(f"`{repo_id}` is named at two different revisions; use one.")
        facts[repo_id] = f
    pinned = pinned_recipe(config, facts)
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
    return Preflight(pinned, facts, verdict, plan.bytes_to_read, plan.bytes_to_write, config.notes)


def commit_description(job: Job, pre: Preflight, what: str = "") -> str:
    """A result commit's description: who asked, the pinned parents, the job's marker."""
    parents = "\n".join(f"- {repo}@{f.sha}" for repo, f in pre.facts.items())
    marker = job_marker(job.id)
    return f"Requested by @{job.spec.requester}{what}.\n\nParents:\n{parents}\n\n{marker}"


class StatusComment:
    """The one comment a job edits at its milestones, within its :class:`~bot.budget.CommentBudget`;
    no-op for jobs with no discussion."""

    def __init__(
        self, hub: Hub, store: JobStore, job: Job, budget: CommentBudget, min_interval_s: float = 0.0
    ) -> None:
        self._hub = hub
        self._store = store
        self._job = job
        self._comment = job.status_comment
        self._budget = budget
        self._min_interval = min_interval_s
        self._last_write = time.monotonic()
        self._next_milestone = 0

    def show(self, text: str) -> None:
        """A milestone (started, publishing): shown if the final word still fits after it."""
        self._write(text, reserve=1, patient=True)

    def finish(self, text: str) -> None:
        """The job's last word (done, failed, cancelled, interrupted): always within the budget."""
        self._write(text, reserve=0, patient=True)

    def progress(self, fraction: float, text: str) -> None:
        """Shown only when ``fraction`` passes the next of 25/50/75 % (one write for several passed),
        and not within ``min_interval_s`` of the previous write (a fast job skips milestones)."""
        passed = [m for m in PROGRESS_MILESTONES[self._next_milestone :] if fraction >= m]
        if not passed:
            return
        self._next_milestone += len(passed)
        if time.monotonic() - self._last_write < self._min_interval:
            return
        # publishing and the last word still to come; a refused edit is not waited for
        self._write(text, reserve=2, patient=False)

    def queue_position(self, text: str, position: int) -> None:
        """A waiting job's new place, when :meth:`CommentBudget.take_position` finds it worth a write."""
        if self._job.spec.report is not None and self._budget.take_position(self._job.id, position):
            self._write(text, reserve=None, patient=False)

    def _write(self, text: str, *, reserve: int | None, patient: bool) -> None:
        report = self._job.spec.report
        if report is None:
            return
        if reserve is not None and not self._budget.take(self._job.id, reserve=reserve):
            log.info("job %s: status comment budget spent; %r not shown", self._job.id, text[:40])
            return
        self._last_write = time.monotonic()
        text = quiet_mentions(text, keep=(self._job.spec.requester,))  # failure reasons quote the recipe
        try:
            if self._comment is None:
                self._comment = self._hub.comment(report.repo_id, report.num, text, patient=patient)
                self._store.set_status_comment(self._job.id, self._comment)
            else:
                self._hub.edit_comment(report.repo_id, report.num, self._comment, text, patient=patient)
        except BotError as exc:  # a report that cannot be written must not fail the merge
            log.warning("job %s: status comment not updated: %s", self._job.id, exc)
        except Exception as exc:  # e.g. the Hub unreachable: say what, not the request (no headers)
            log.warning("job %s: status comment not updated (%s)", self._job.id, type(exc).__name__)


def queued_text(job_id: str, position: int | None, summary: str = "", notes: tuple[str, ...] = ()) -> str:
    """The status comment of a queued job: its place, the preflight's summary and the recipe's notes."""
    where = f" (position {position} in the queue)" if position else ""
    more = f"\n\nPreflight passed: {summary}." if summary else ""
    if notes:
        # notes quote the recipe's own keys, so they are shown as the recipe's text is: in a code block
        more += "\n\nNotes on the recipe:\n" + code_block("\n".join(notes))
    return f"⏳ Job `{job_id}` is queued{where}.{more}"


def quality_note(report: QualityReport | None) -> str:
    """What the final comment adds about the quality check: its table (or why it was skipped), and
    a warning when the merge was published despite failing it."""
    if report is None:
        return ""
    forced = "\n\n⚠️ Published despite failing its quality check, as `--force` asked." * (
        report.status == "failed"
    )
    return f"{forced}\n\n{report.markdown()}"


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
        self.comments = CommentBudget()  # status-comment writes per job (see bot.budget)
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
        status = StatusComment(self.hub, self.store, job, self.comments, self.settings.progress_interval_s)
        publisher = self.publisher(job)
        if publisher is None:  # a signed-in user's job whose token this process never had
            self.store.hold_for_sign_in(job.id)
            log.info("job %s waits for its requester to sign in again", job.id)
            return
        minutes = self.settings.job_timeout_minutes
        self._deadline = None if minutes is None else self.clock() + 60 * minutes
        # The comment is written before the state, so whoever sees a finished job also sees its report.
        try:
            commit, quality = self._run(job, status, publisher)
        except JobInterrupted:
            status.finish(f"⏸️ Job `{job.id}` was interrupted by a restart of the bot; it will start again.")
            self.store.requeue(job.id)
            return  # the process is stopping: its credentials go with it
        except JobCancelled:
            status.finish(f"🛑 Job `{job.id}` was cancelled; nothing was published.")
            self.store.finish(job.id, "cancelled", reason="cancelled by the requester")
        except HubError as exc:
            if job.spec.credential == "user" and exc.status == 401:  # the user's token expired or was revoked
                self.store.hold_for_sign_in(job.id, SIGN_IN_EXPIRED)
            else:
                status.finish(f"❌ Job `{job.id}` failed: {exc}\n\nNothing was published.")
                self.store.finish(job.id, "failed", reason=str(exc))
        except MergeError as exc:  # the engine's plain text can quote a parent's files: shown as code
            status.finish(f"❌ Job `{job.id}` failed:\n\n{code_block(str(exc))}\n\nNothing was published.")
            self.store.finish(job.id, "failed", reason=str(exc))
        except BotError as exc:
            status.finish(f"❌ Job `{job.id}` failed: {exc}\n\nNothing was published.")
            self.store.finish(job.id, "failed", reason=str(exc))
        except Exception:
            log.exception("job %s failed with an unexpected error", job.id)
            status.finish(
                f"❌ Job `{job.id}` failed with an internal error; the bot's operator has the details."
            )
            self.store.finish(job.id, "failed", reason="internal error")
        else:
            url = self.hub.repo_url(job.spec.destination)
            status.finish(
                f"✅ Job `{job.id}` is done: [{job.spec.destination}]({url}) (commit `{commit[:12]}`)."
                + quality_note(quality)
            )
            self.store.finish(job.id, "succeeded", commit=commit)
        self.credentials.drop(job.id)
        self.comments.forget(job.id)

    def refresh_positions(self, limit: int = 20) -> None:
        """The queue moved: show waiting jobs their new place (the first ``limit``), as rationed by
        :meth:`CommentBudget.take_position` (each write is a webhook delivery)."""
        for waiting in self.store.all(states=("queued",))[:limit]:
            position = self.store.queue_position(waiting.id)
            if waiting.status_comment is not None and position:
                StatusComment(self.hub, self.store, waiting, self.comments).queue_position(
                    queued_text(waiting.id, position), position
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

    def card(
        self,
        job: Job,
        pre: Preflight,
        lineage: Lineage,
        search: SearchHistory | None = None,
        quality: QualityReport | None = None,
        anatomy: bool = False,
    ) -> bytes:
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
            quality=quality,
            anatomy=anatomy,
        )
        return render_card(context).encode()

    def check_quality(self, job: Job, pre: Preflight, out: Path, token: str) -> QualityReport:
        """The merge's quality check against its parents (skipped for a model without a tokenizer).

        The parents are read with ``token``: the requester's rights, as for the merge itself.

        Raises:
            QualityCheckFailed: it failed and the request did not say ``--force``.
        """
        report = check_quality(
            out,
            pre.config.referenced_models(),
            options=QualityOptions(device=self.settings.device),
            hub_endpoint=self.settings.hf_endpoint,
            hub_token=token,
            scratch_dir=out.parent,
        )
        log.info("job %s: %s", job.id, report.summary())
        if not report.passed and not job.spec.force:
            raise QualityCheckFailed(report.reasons, report.markdown())
        return report

    def _run(self, job: Job, status: StatusComment, publisher: Hub) -> tuple[str, QualityReport | None]:
        if self._stopping.is_set():
            raise JobInterrupted(job.id)
        spec = job.spec
        marker = job_marker(job.id)
        pushed = publisher.commit_with_marker(spec.destination, marker)
        if pushed is not None:  # a previous process pushed, then died before recording it
            log.info("job %s was already pushed as %s", job.id, pushed.oid)
            return pushed.oid, None
        if spec.kind == "evolve":
            from bot.evolve import run_evolve  # imports optuna and transformers: only for evolve jobs

            return run_evolve(self, job, status, publisher), None
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
            status.progress(done / total, f"⚙️ Job `{job.id}` is running: {100 * done // total}% merged.")

        with (
            tempfile.TemporaryDirectory(prefix=f"job-{job.id}-", dir=self.settings.work_dir) as tmp,
            publisher.publication(spec.destination, private=spec.private, gated=pre.verdict.gated) as pub,
        ):
            out = Path(tmp) / "out"
            uploads = Path(tmp) / "uploads"
            uploads.mkdir()

            def upload_shard(path: str) -> None:
                # The upload deletes what it sends, but the quality check reads the shards after
                # the merge: it is sent a hard link (no second copy on disk where links work).
                sent = uploads / os.path.basename(path)
                try:
                    os.link(path, sent)
                except OSError:
                    shutil.copyfile(path, sent)
                pub.upload_now(sent.name, sent)

            run_merge(
                pre.config,
                out,
                options=MergeOptions(
                    hub_endpoint=self.settings.hf_endpoint,
                    hub_token=token,
                    device=self.settings.device,
                    out_shard_size=self.settings.shard_bytes,
                    verify=True,  # nothing is committed unless transformers loads the output
                    report=True,  # merge_report.json and merge_anatomy.png go into the repo and the card
                ),
                progress=progress,
                on_shard=upload_shard,
            )
            self.checkpoint(job)
            quality = self.check_quality(job, pre, out, token)
            staged = set(pub.staged)
            for file in sorted(out.iterdir()):
                if file.name not in staged and file.is_file():
                    pub.add(file.name, file)
            pub.add(
                "README.md",
                self.card(job, pre, lineage, quality=quality, anatomy=(out / PLOT_NAME).is_file()),
            )
            status.show(f"📦 Job `{job.id}` is merged; publishing `{spec.destination}`…")
            title = f"{'Re-merge' if spec.kind == 'remerge' else 'Merge'} {name} ({marker})"
            return pub.commit(title, commit_description(job, pre)), quality
