"""The bot: webhook events and polls -> commands -> jobs, and the replies in discussions.

It wires one :class:`~bot.hub.Hub`, one :class:`~bot.jobs.JobStore`, one
:class:`~bot.jobs.JobQueue` and one :class:`~bot.worker.Worker`. Deliveries are recorded
(de-duplicated) at once and handled on the queue's light executor, so the webhook answers fast.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

from bot import commands as cmd
from bot.credentials import Credentials, UserCredential
from bot.errors import (
    BotError,
    DestinationError,
    JobNotFound,
    PreflightError,
    QuotaError,
    TooLargeError,
)
from bot.hub import DiscussionComment, Hub
from bot.jobs import ACTIVE, Job, JobQueue, JobSpec, JobStore, ReportTo, is_guest, make_engine
from bot.markdown import code_block, prose, quiet_mentions
from bot.rights import ANONYMOUS, Rights
from bot.settings import Settings
from bot.webhooks import DiscussionEvent, Ignored, RepoUpdate, compact, delivery_key, parse_event
from bot.worker import Worker, _walk_models, hub_repo, preflight, queued_text
from engine import MergeConfig, MergeError, RecipeError
from engine.evolve.errors import SearchFileError

log = logging.getLogger(__name__)


def user_message(exc: Exception) -> str:
    """The one table that turns errors into discussion replies.

    The engine's messages are plain text that quote the user's YAML (keys, values), so they are
    shown in a code block nothing in them can close; the bot's own messages are markdown whose
    quoted user text is already escaped (see :mod:`bot.markdown`).
    """
    if isinstance(exc, RecipeError | SearchFileError):
        what = "recipe" if isinstance(exc, RecipeError) else "search file"
        return (
            f"❌ I could not use that {what}.\n\n{code_block(str(exc))}\n\n"
            f"Nothing was queued; fix the {what} and ask again."
        )
    if isinstance(exc, MergeError):
        return f"❌ I could not do that.\n\n{code_block(str(exc))}\n\nNothing was queued."
    if isinstance(exc, BotError):
        return f"❌ {exc}\n\nNothing was queued."
    return "❌ Something went wrong on my side; nothing was queued. The bot's operator has the details."


class Bot:
    """The service behind the webhook: start it, feed it deliveries, stop it."""

    def __init__(self, settings: Settings, hub: Hub | None = None) -> None:
        self.settings = settings
        self.hub = hub or Hub(settings.hf_endpoint, settings.hf_token.get_secret_value())
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(make_engine(settings.database_url))
        self.credentials = Credentials()  # signed-in users' tokens: memory only, see bot.credentials
        self.worker = Worker(settings, self.hub, self.store, self.credentials)
        self.queue = JobQueue(self.store, settings.database_url, self.worker.run)
        self.name = ""
        self.account_id = ""  # the bot account's id: payloads name authors by id only
        self._poll_cursor = (0, 0)  # (repo, discussion) where the next poll's reading starts

    @property
    def namespace(self) -> str:
        """Where the bot publishes merges asked for in discussions or without sign-in.

        ``MERGEBOT_NAMESPACE`` (an organisation the bot's token can write to), else the bot's own account.
        """
        return self.settings.namespace or self.name or self.hub.whoami()

    @property
    def requests_repo(self) -> str:
        return self.settings.requests_repo or f"{self.namespace}/requests"

    def start(self, *, run_jobs: bool = True) -> None:
        """Start the queue (resuming interrupted jobs) and handle deliveries left unhandled."""
        self.name = self.hub.whoami()
        self.account_id = self.hub.account().id  # cached with the name: no second call
        self.hold_orphaned_user_jobs()
        self.queue.start(run_jobs=run_jobs)
        for key, payload in self.store.pending():
            self.queue.submit_light(self.handle, key, payload)
        if self.settings.poll_interval_s > 0:
            self.queue.every(self.settings.poll_interval_s, self.poll, "mergebot-poll")
        log.info("bot %s started against %s", self.name, self.settings.hf_endpoint)

    def hold_orphaned_user_jobs(self) -> list[str]:
        """Jobs that publish with a user's token this process does not hold wait for a new sign-in.

        Never published with the bot's token instead, never dropped: see :mod:`bot.credentials`.
        """
        held = []
        for job in self.store.all(states=("queued", "running")):
            orphaned = job.spec.credential == "user" and self.credentials.get(job.id) is None
            if orphaned and self.store.hold_for_sign_in(job.id):
                held.append(job.id)
        if held:
            log.info("%d job(s) wait for their requester to sign in again", len(held))
        return held

    def cancel_job(self, job_id: str) -> str:
        """Cancel a job (the caller has checked who may); returns what the requester should read."""
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        was = self.store.cancel(job_id)
        if was in ("queued", "needs_sign_in"):
            self.queue.unschedule(job_id)
            self.credentials.drop(job_id)
            if job.spec.report is not None and job.status_comment:
                try:
                    self.hub.edit_comment(
                        job.spec.report.repo_id,
                        job.spec.report.num,
                        job.status_comment,
                        f"🛑 Job `{job_id}` was cancelled before it started.",
                    )
                except BotError as exc:
                    log.warning("job %s: status comment not updated: %s", job_id, exc)
            return f"Cancelled job `{job_id}`."
        if was == "running":
            return f"Job `{job_id}` is stopping; nothing will be published."
        return f"Job `{job_id}` is already {was}."

    def stop(self) -> None:
        """Stop: a running merge stops at its next tensor and goes back to the queue."""
        self.worker.stop()
        self.queue.stop(wait=True)

    # -- deliveries ---------------------------------------------------------------------

    def receive(self, payload: dict[str, Any]) -> bool:
        """Record a delivery (the fields the bot reads) and queue its handling; False for a duplicate.

        A delivery that cannot be a command (the bot's own comment, any comment edit) is dropped
        at once, unrecorded: the bot's status edits come back as deliveries and must cost nothing.

        Raises:
            bot.webhooks.WebhookRejected: not a Hub payload (nothing is recorded).
        """
        event = parse_event(payload, own_id=self.account_id or None)  # rejects what is not a Hub payload
        if isinstance(event, Ignored):
            log.debug("delivery ignored: %s", event.why)
            return True
        payload = compact(payload)
        key = delivery_key(payload)
        if not self.store.remember(key, payload):
            return False
        self.queue.submit_light(self.handle, key, payload)
        return True

    def handle(self, key: str, payload: dict[str, Any]) -> None:
        """Handle one recorded delivery; it is marked done whatever happens (a bug must not loop)."""
        try:
            event = parse_event(payload, own_id=self.account_id or None)
            if isinstance(event, DiscussionEvent):
                self.on_discussion(event.repo_id, event.num, event.comment_id)
            elif isinstance(event, RepoUpdate):
                self.on_repo_update(event.repo_id, event.head_sha)
        except Exception:
            log.exception("delivery %s could not be handled", key)
        finally:
            self.store.mark_done(key)

    def on_discussion(self, repo_id: str, num: int, comment_id: str | None) -> None:
        """A new discussion (its opening post) or comment: read it and answer it if it is for the bot."""
        details = self.hub.discussion(repo_id, num)
        if not details.comments:
            return
        comment = (
            details.comments[0]
            if comment_id is None
            else next((c for c in details.comments if c.id == comment_id), None)
        )
        if comment is None:
            return
        self.on_comment(repo_id, num, comment)

    def on_comment(self, repo_id: str, num: int, comment: DiscussionComment) -> None:
        command = cmd.parse(comment.content, self.name, author=comment.author)
        if command is None or not self.store.remember(f"comment:{comment.id}"):
            return
        try:
            reply = self.execute(command, repo_id, num, comment)
        except (BotError, MergeError) as exc:
            reply = user_message(exc)
        except Exception as exc:
            log.exception("command in %s #%d failed", repo_id, num)
            reply = user_message(exc)
        if reply:  # the bot addresses only the requester (and names itself): other @names go inert
            self.hub.comment(repo_id, num, quiet_mentions(reply, keep=(comment.author, self.name)))

    # -- commands -----------------------------------------------------------------------

    def execute(self, command: cmd.Command, repo_id: str, num: int, comment: DiscussionComment) -> str | None:
        """Run one command; returns the reply to post (None when the job's status comment is the reply)."""
        user = comment.author
        if isinstance(command, cmd.Invalid):
            return f"🤔 I did not understand that: {command.problem}\n\n{cmd.usage(self.name)}"
        if isinstance(command, cmd.Help):
            return cmd.usage(self.name)
        if isinstance(command, cmd.Status):
            return self._status(user)
        if isinstance(command, cmd.Cancel):
            return self._cancel(user, command.job_id, repo_id, num)
        if isinstance(command, cmd.Merge):
            self._merge(command, user, ReportTo(repo_id=repo_id, num=num), comment.id)
            return None
        if isinstance(command, cmd.Evolve):
            self.evolve(
                command.search,
                name=command.name,
                user=user,
                private=command.private,
                accept_license=command.accept_license,
                report=ReportTo(repo_id=repo_id, num=num),
                source=comment.id,
            )
            return None
        if isinstance(command, cmd.Remerge):
            self._remerge(repo_id, user, ReportTo(repo_id=repo_id, num=num), comment.id)
            return None
        raise AssertionError(f"unhandled command {command!r}")

    def check_room(
        self, user: str, destination: str, *, owner: Hub | None = None, rename: str = "`--name`"
    ) -> None:
        """Refuse a new job: the user (or all guests together) has too many waiting, or its destination is taken.

        ``owner``: the Hub client of the destination's namespace (default: the bot's);
        ``rename``: what the user changes to pick another destination.
        """
        if self.store.active_count(user) >= self.settings.max_jobs_per_user:
            raise QuotaError(user, self.settings.max_jobs_per_user)
        if is_guest(user) and self.store.active_guest_count() >= self.settings.max_guest_jobs:
            raise QuotaError(user, self.settings.max_guest_jobs, guests=True)
        if self.destination_taken(destination, owner=owner):
            raise DestinationError(f"`{destination}` already exists; choose another {rename}.")

    def destination_taken(self, destination: str, *, owner: Hub | None = None) -> bool:
        """A job already waits or runs for it, or the repo exists (seen by ``owner``, default the bot)."""
        return bool(self.store.active_for(destination)) or (owner or self.hub).repo_exists(destination)

    def check_slices(self, config: MergeConfig) -> None:
        """Refuse a recipe that stacks more than ``max_slices`` slices.

        Raises:
            bot.errors.PreflightError: it does.
        """
        count = len(config.slices or [])
        if count > self.settings.max_slices:
            raise PreflightError(
                f"The recipe stacks {count} slices; this bot merges at most {self.settings.max_slices}."
            )

    def check_size(self, bytes_to_write: int) -> None:
        """Refuse a merge whose output is above ``MERGEBOT_MAX_MERGE_GB``.

        Raises:
            bot.errors.TooLargeError: it is.
        """
        limit = self.settings.max_merge_bytes
        if limit is not None and bytes_to_write > limit:
            raise TooLargeError(bytes_to_write, limit)

    def _merge(self, command: cmd.Merge, user: str, report: ReportTo, source: str) -> Job:
        destination = f"{self.namespace}/{command.name}"
        self.check_room(user, destination)
        pre = preflight(  # a discussion proves no rights: what an anonymous visitor could read
            self.hub,
            command.recipe,
            accept_license=command.accept_license,
            name=command.name,
            endpoint=self.settings.hf_endpoint,
            token=self.settings.hf_token.get_secret_value(),
            rights=ANONYMOUS,
            private=command.private,
        )
        self.check_slices(pre.config)
        self.check_size(pre.bytes_to_write)
        spec = JobSpec(
            kind="merge",
            requester=user,
            destination=destination,
            recipe_yaml=pre.config.to_yaml(),
            parents={repo: f.sha for repo, f in pre.facts.items()},
            private=command.private,
            accept_license=command.accept_license,
            report=report,
            source_comment=source,
            force=command.force,
        )
        return self.enqueue(spec, pre.summary(), notes=pre.notes)

    def evolve(
        self,
        search_yaml: str,
        *,
        name: str,
        user: str,
        private: bool = False,
        accept_license: bool = False,
        report: ReportTo | None = None,
        source: str | None = None,
        signed_in: UserCredential | None = None,
    ) -> Job:
        """Queue an evolutionary search after its preflight (see :mod:`bot.evolve`).

        ``signed_in``: the result goes to that user's namespace, published with their token
        (held in memory only; the caller has confirmed it is theirs).

        Raises:
            engine.MergeError, bot.errors.BotError: the request is refused; nothing was queued.
        """
        from bot.evolve import SearchLimits, preflight_search

        destination = f"{signed_in.user if signed_in else self.namespace}/{name}"
        owner = self.hub.as_user(signed_in.token.get_secret_value()) if signed_in else None
        self.check_room(user, destination, owner=owner)
        pre = preflight_search(
            self.hub,
            search_yaml,
            accept_license=accept_license,
            name=name,
            endpoint=self.settings.hf_endpoint,
            token=self.settings.hf_token.get_secret_value(),
            limits=SearchLimits.of(self.settings),
            rights=Rights(signed_in.token) if signed_in else ANONYMOUS,
            private=private,
        )
        self.check_size(pre.bytes_to_write)
        spec = JobSpec(
            kind="evolve",
            requester=user,
            destination=destination,
            recipe_yaml="",
            search_yaml=pre.search_yaml,
            parents={repo: f.sha for repo, f in pre.facts.items()},
            private=private,
            accept_license=accept_license,
            report=report,
            source_comment=source,
            credential="user" if signed_in else "bot",
        )
        return self.enqueue(spec, pre.summary(), signed_in)

    def _remerge(self, repo_id: str, user: str | None, report: ReportTo | None, source: str | None) -> Job:
        previous = next((j for j in self.store.latest_results() if j.spec.destination == repo_id), None)
        if previous is None:
            raise DestinationError(f"`{repo_id}` is not a merge I made, so I cannot re-merge it.")
        if self.store.active_for(repo_id):
            raise DestinationError(f"A job for `{repo_id}` is already waiting or running.")
        if previous.spec.credential == "user":
            raise DestinationError(
                f"`{repo_id}` was published with its requester's own sign-in, which the bot does not keep; "
                "its requester can merge it again from the Space."
            )
        unpinned = yaml.safe_dump(
            _walk_models(yaml.safe_load(previous.spec.recipe_yaml), lambda ref: hub_repo(ref)[0]),
            sort_keys=False,
        )
        pre = preflight(
            self.hub,
            unpinned,
            accept_license=previous.spec.accept_license,
            name=repo_id.split("/")[-1],
            endpoint=self.settings.hf_endpoint,
            token=self.settings.hf_token.get_secret_value(),
            rights=ANONYMOUS,  # the same rights as the first time: a parent gone private or gated is refused
            private=previous.spec.private,
        )
        self.check_slices(pre.config)
        self.check_size(pre.bytes_to_write)
        spec = previous.spec.model_copy(
            update={
                "kind": "remerge",
                "recipe_yaml": pre.config.to_yaml(),
                "parents": {repo: f.sha for repo, f in pre.facts.items()},
                "report": report if report is not None else previous.spec.report,
                "source_comment": source,
                "requester": user or previous.spec.requester,
            }
        )
        return self.enqueue(spec, pre.summary(), notes=pre.notes)

    def enqueue(
        self,
        spec: JobSpec,
        summary: str = "",
        signed_in: UserCredential | None = None,
        *,
        notes: tuple[str, ...] = (),
    ) -> Job:
        """Add a preflighted job to the store and the scheduler; its user credential first, if any.

        ``summary`` and ``notes`` (the recipe's, see engine.MergeConfig.notes) go in the status comment.
        """
        job = self.store.add(spec)
        if signed_in is not None:  # before it is scheduled, so the worker finds it
            self.credentials.put(job.id, signed_in)
        if spec.report is not None:
            position = self.store.queue_position(job.id)
            text = queued_text(job.id, position, summary, notes)
            try:
                self.store.set_status_comment(
                    job.id, self.hub.comment(spec.report.repo_id, spec.report.num, text)
                )
                self.worker.comments.queued(job.id, position)
            except BotError as exc:
                log.warning("job %s: status comment not posted: %s", job.id, exc)
        self.queue.schedule(job.id)
        log.info("job %s queued: %s for %s", job.id, spec.destination, spec.requester)
        return job

    def _status(self, user: str) -> str:
        jobs = self.store.all(requester=user)[-10:]
        if not jobs:
            return f"@{user} has no jobs. {cmd.usage(self.name).splitlines()[0]}"
        lines = [f"Jobs of @{user} (latest {len(jobs)}):", "", "| job | repo | state |", "|---|---|---|"]
        for job in jobs:
            state: str = job.state
            if job.state == "queued":
                state = f"queued (position {self.store.queue_position(job.id)})"
            elif job.state == "running":
                state = f"running ({round(100 * job.progress)}%)"
            elif job.state == "failed":
                first = next(iter((job.reason or "").splitlines()), "")
                state = f"failed: {prose(first[:120])}"
            elif job.state == "needs_sign_in":
                state = "waiting: sign in again on the Space to resume it"
            lines.append(f"| `{job.id}` | {job.spec.destination} | {state} |")
        return "\n".join(lines)

    def _cancel(self, user: str, job_id: str | None, repo_id: str, num: int) -> str:
        if job_id is None:
            mine = [
                j
                for j in self.store.all(requester=user, states=ACTIVE)
                if j.spec.report == ReportTo(repo_id=repo_id, num=num)
            ]
            if not mine:
                return f"@{user} has no waiting or running job started in this discussion."
            job_id = mine[-1].id
        job = self.store.get(job_id)
        if job is None or job.spec.requester != user:
            raise JobNotFound(job_id)
        return self.cancel_job(job_id)

    # -- parents ------------------------------------------------------------------------

    def on_repo_update(self, repo_id: str, head_sha: str | None) -> list[Job]:
        """A watched repo moved: re-merge every result that used it at an older commit."""
        started = []
        for previous in self.store.latest_results():
            pinned = previous.spec.parents.get(repo_id)
            if pinned is None or pinned == head_sha:
                continue
            if any(
                j.spec.parents.get(repo_id) == head_sha for j in self.store.all_for(previous.spec.destination)
            ):
                continue  # already re-merged (or tried) at this commit
            if self.store.active_for(previous.spec.destination):
                continue
            try:
                started.append(self._remerge(previous.spec.destination, None, None, None))
            except (BotError, MergeError) as exc:
                log.warning("re-merge of %s after %s moved: %s", previous.spec.destination, repo_id, exc)
                if isinstance(exc, PreflightError):  # e.g. a parent gone private or gated
                    self._note_refused(previous, repo_id, head_sha, exc)
        return started

    def _note_refused(self, previous: Job, parent: str, head_sha: str | None, exc: PreflightError) -> None:
        """Say once, in the result's discussion, why a parent's update was not re-merged."""
        report = previous.spec.report
        if report is None or not self.store.remember(f"refused:{previous.spec.destination}:{parent}:{head_sha}"):
            return
        text = (
            f"⚠️ `{parent}` changed, but `{previous.spec.destination}` was not re-merged:\n\n{exc}\n\n"
            "The published version stays as it was."
        )
        try:
            self.hub.comment(report.repo_id, report.num, text)
        except BotError as exc2:
            log.warning("re-merge refusal for %s not reported: %s", previous.spec.destination, exc2)

    def poll(self) -> None:
        """Catch what webhooks missed (the Hub never redelivers): moved parents, and commands in
        every discussion the bot answers (see :meth:`catch_up`)."""
        try:
            parents = {repo for job in self.store.latest_results() for repo in job.spec.parents}
            for repo in sorted(parents):
                head = self.hub.head_sha(repo)
                if head is not None:
                    self.on_repo_update(repo, head)
        except Exception:
            log.exception("poll of the parents failed")
        try:
            self.catch_up()
        except Exception:
            log.exception("poll of the discussions failed")

    def answered_repos(self) -> list[str]:
        """Where the bot answers commands: its requests repo, then the repos it published, newest first."""
        published = sorted(
            (
                j
                for j in self.store.all(states=("succeeded",))
                if j.spec.destination.startswith(f"{self.name}/")
            ),
            key=lambda j: j.updated_at,
            reverse=True,
        )
        return list(dict.fromkeys([self.requests_repo, *(j.spec.destination for j in published)]))

    def catch_up(self) -> int:
        """Read the open discussions of :meth:`answered_repos` and answer what is unanswered.

        At most ``settings.poll_max_calls`` Hub reads a cycle (one per repo listed, one per
        discussion read, newest discussion first); a cycle goes once round the repos at most and
        the next one starts where it stopped, so every discussion is read within a few cycles.
        Returns the reads made.
        """
        budget = self.settings.poll_max_calls
        repos = self.answered_repos()
        repo_i, offset = self._poll_cursor if self._poll_cursor[0] < len(repos) else (0, 0)
        calls = 0
        for _ in range(len(repos)):
            if calls >= budget:
                break
            repo = repos[repo_i]
            calls += 1
            for k, num in enumerate(self.hub.open_discussions(repo)[offset:]):
                if calls >= budget:
                    self._poll_cursor = (repo_i, offset + k)
                    return calls
                calls += 1
                for comment in self.hub.discussion(repo, num).comments:
                    self.on_comment(repo, num, comment)
            repo_i, offset = (repo_i + 1) % len(repos), 0
        self._poll_cursor = (repo_i, offset)
        return calls
