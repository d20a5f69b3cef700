"""The Space's thin adapter over the bot: check a recipe, submit it to the bot's queue, list jobs.

It adds no merge logic. ``check`` gathers the same facts as ``bot.worker.preflight`` but keeps
going after a problem, so the page can show every row of the compatibility table and the
licence verdict together; ``submit`` runs the bot's own ``preflight`` (which refuses what the
check refused) and enters the job in the bot's store and scheduler, the queue the discussion
commands use.

Signed in with Hugging Face, a user's merge goes to the user's namespace and is published with
the user's own token, which the bot holds in memory only (:mod:`bot.credentials`); after a
restart such a job waits in ``needs_sign_in`` until the same user signs in and resumes it.
Without sign-in, merges go to the bot's (the Space's organisation's) namespace, may use public,
ungated repos only, and cannot be private (:mod:`bot.rights`); each page session is its own guest
(``guest:<random>``, see :func:`bot.jobs.new_guest`), with its own quota and its own jobs to cancel.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.cards import build_context, render_card
from bot.credentials import UserCredential
from bot.errors import BotError, DestinationError, JobNotFound
from bot.hub import Lineage, RepoFacts
from bot.jobs import Job, JobSpec, is_guest, new_guest
from bot.licenses import LicenseVerdict, ParentLicense, decide
from bot.rights import ANONYMOUS, Rights, rights_problems
from bot.service import Bot
from bot.worker import READ_BYTES_PER_S, hub_repo, pinned_recipe, preflight
from engine import MergeConfig, MergeError, MergeOptions, RecipeError, build_plan, load_recipe
from engine.check import Audit, audit_models
from engine.run import OpenModels

if TYPE_CHECKING:
    from engine.evolve.spec import Evaluation

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PRIVATE = "(private)"  # what the queue shows others of a private job's requester and destination


@dataclass(frozen=True)
class CheckReport:
    """Everything the page shows after "Check"; ``ok`` says whether "Submit" may queue it."""

    problems: tuple[str, ...] = ()  # what stops the merge, written for the user
    config: MergeConfig | None = None
    facts: tuple[RepoFacts, ...] = ()
    audit: Audit | None = None
    verdict: LicenseVerdict | None = None
    bytes_to_read: int = 0
    bytes_to_write: int = 0
    card_markdown: str = ""
    destination: str = ""
    notes: tuple[str, ...] = ()  # what the recipe sets to no effect (see engine.MergeConfig.notes)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def seconds_estimate(self) -> float:
        return self.bytes_to_read / READ_BYTES_PER_S


@dataclass(frozen=True)
class SearchCheck:
    """What the Evolve tab shows after "Check": what is searched, and what stops it if anything."""

    problems: tuple[str, ...] = ()
    method: str = ""
    dimensions: tuple[str, ...] = ()  # the searched coordinates, e.g. "weight tiny-math"
    trials: int = 0
    baselines: tuple[str, ...] = ()
    evaluation: str = ""
    destination: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def _validation_note(evaluation: Evaluation) -> str:
    if not evaluation.validation_size:
        return ""
    return (
        f"; the final recipe is the best of the {evaluation.finalists} best search trials and the "
        f"baselines on {evaluation.validation_size} validation items"
    )


def _valid_name(name: str) -> str | None:
    if not name:
        return "Give the merged model a name (the repo it is published to)."
    if not NAME_PATTERN.match(name):
        return f"`{name}` is not a valid repo name: use letters, digits, `-`, `_` and `.`."
    return None


class SpaceService:
    """The bot's services as the Space uses them."""

    def __init__(self, bot: Bot) -> None:
        self.bot = bot

    @property
    def hub_url(self) -> str:
        return self.bot.hub.endpoint

    def namespace(self, user: str | None = None) -> str:
        """Where merges are published: a signed-in user's own namespace, else the bot's (MERGEBOT_NAMESPACE)."""
        return user or self.bot.namespace

    def destination(self, name: str, user: str | None = None) -> str:
        return f"{self.namespace(user)}/{name}"

    def _confirm(self, signed_in: UserCredential) -> None:
        """The token must be the signed-in user's own (it publishes in that namespace)."""
        try:
            owner = self.bot.hub.as_user(signed_in.token.get_secret_value()).whoami()
        except BotError:
            owner = None
        if owner != signed_in.user:
            raise DestinationError("Your Hugging Face sign-in could not be confirmed; sign out and in again.")

    def repo_url(self, repo_id: str) -> str:
        return self.bot.hub.repo_url(repo_id)

    # -- check ----------------------------------------------------------------------------

    def check(
        self,
        recipe_yaml: str,
        *,
        name: str,
        accept_license: bool = False,
        user: str | None = None,
        signed_in: UserCredential | None = None,
        private: bool = False,
    ) -> CheckReport:
        """The preflight report for a recipe.

        Args:
            user: the signed-in user's name (the destination is in their namespace).
            signed_in: their credential: the parents are read, and judged, with their token;
                without it, as an anonymous visitor would see them.
            private: whether the result is to be private.

        Never raises for anything a user can cause.
        """
        if signed_in is not None:
            user = signed_in.user
        rights = Rights(signed_in.token) if signed_in is not None else ANONYMOUS
        reader = rights.reader(self.bot.hub)
        try:
            config = load_recipe(recipe_yaml if recipe_yaml.endswith("\n") else recipe_yaml + "\n")
        except RecipeError as exc:
            return CheckReport(problems=(f"The recipe is not valid:\n{exc}",))
        problems: list[str] = []
        name_problem = _valid_name(name)
        destination = self.destination(name, user) if name_problem is None else ""
        if name_problem:
            problems.append(name_problem)
        elif self.bot.destination_taken(destination):
            problems.append(f"`{destination}` already exists; choose another name.")
        facts: dict[str, RepoFacts] = {}
        all_read = True
        for ref in config.referenced_models():
            try:
                repo_id, revision = hub_repo(ref)
                facts.setdefault(repo_id, reader.repo_facts(repo_id, revision))
            except BotError as exc:
                problems.append(str(exc))
                all_read = False
        problems.extend(rights_problems(facts.values(), rights, private=private))
        verdict = decide(
            [
                ParentLicense(f.repo_id, f.license, f.license_name, f.license_link, f.gated)
                for f in facts.values()
            ],
            accept_license=accept_license,
            model_name=name or None,
        )
        if not verdict.allowed:
            problems.append("The parents' licences do not allow this merge (see the licence verdict).")
        audit = None
        read = write = 0
        if all_read:
            options = MergeOptions(
                hub_endpoint=self.bot.settings.hf_endpoint,
                hub_token=rights.read_token(self.bot.settings.hf_token.get_secret_value()),
                device="cpu",
            )
            pinned = pinned_recipe(config, facts)  # read from the Hub, never from the Space's disk
            try:
                self.bot.check_slices(config)
                with OpenModels(pinned, options) as opened:
                    metadata = opened.metadata()
                    audit = audit_models(pinned, metadata)
                    if audit.ok:
                        plan = build_plan(pinned, metadata)
                        read, write = plan.bytes_to_read, plan.bytes_to_write
                        self.bot.check_size(write)
            except (MergeError, BotError) as exc:
                problems.append(str(exc))
        if audit is not None:
            problems.extend(f"The models do not agree: {m}." for m in audit.mismatches)
            if audit.plan_error and not audit.mismatches:
                problems.append(audit.plan_error)
        card = ""
        if facts:
            lineage = self._lineage(list(facts))
            context = build_context(
                repo_id=destination or f"{self.namespace(user)}/{name or 'your-merge'}",
                requester=self.namespace(user),
                bot_name=self.bot.name or self.bot.hub.whoami(),
                hub_url=self.hub_url,
                method=config.merge_method,
                recipe_yaml=config.to_yaml(),
                facts=facts,
                lineage=lineage,
                verdict=verdict,
                job_id="preview",
            )
            try:
                card = render_card(context)
            except Exception:  # a preview must never hide the check itself
                log.exception("card preview failed")
        return CheckReport(
            problems=tuple(dict.fromkeys(problems)),
            config=config,
            facts=tuple(facts.values()),
            audit=audit,
            verdict=verdict,
            bytes_to_read=read,
            bytes_to_write=write,
            card_markdown=card,
            destination=destination,
            notes=config.notes,
        )

    def _lineage(self, roots: list[str]) -> Lineage:
        try:
            return self.bot.hub.lineage(roots, self.bot.settings.lineage_depth)
        except BotError:
            return Lineage(tuple(roots))

    # -- submit ---------------------------------------------------------------------------

    def submit(
        self,
        recipe_yaml: str,
        *,
        name: str,
        private: bool = False,
        accept_license: bool = False,
        requester: str | None = None,
        signed_in: UserCredential | None = None,
    ) -> Job:
        """Queue the merge in the bot's queue, after the bot's own preflight.

        Args:
            requester: the page session's guest identity (:func:`bot.jobs.new_guest`), when nobody
                signed in; anything else (or None) gets a fresh one.
            signed_in: the user signed in with Hugging Face: the merge goes to their namespace
                and is published with their token, held in memory only.

        Raises:
            engine.RecipeError, engine.MergeError, bot.errors.BotError: the merge is refused
            (the message says why); nothing was queued.
        """
        user = self._submitter(name, requester, signed_in)
        destination = self.destination(name, signed_in.user if signed_in else None)
        owner_hub = self.bot.hub.as_user(signed_in.token.get_secret_value()) if signed_in else None
        self.bot.check_room(user, destination, owner=owner_hub, rename="name")
        pre = preflight(
            self.bot.hub,
            recipe_yaml,
            accept_license=accept_license,
            name=name,
            endpoint=self.bot.settings.hf_endpoint,
            token=self.bot.settings.hf_token.get_secret_value(),
            rights=Rights(signed_in.token) if signed_in else ANONYMOUS,
            private=private,
        )
        self.bot.check_slices(pre.config)
        self.bot.check_size(pre.bytes_to_write)
        spec = JobSpec(
            kind="merge",
            requester=user,
            destination=destination,
            recipe_yaml=pre.config.to_yaml(),
            parents={repo: f.sha for repo, f in pre.facts.items()},
            private=private,
            accept_license=accept_license,
            credential="user" if signed_in else "bot",
        )
        return self._enqueue(spec, signed_in)

    def _enqueue(self, spec: JobSpec, signed_in: UserCredential | None) -> Job:
        job = self.bot.enqueue(spec, signed_in=signed_in)
        log.info("job %s queued from the Space: %s for %s", job.id, spec.destination, spec.requester)
        return job

    # -- evolve ---------------------------------------------------------------------------

    def check_search(
        self,
        search_yaml: str,
        *,
        name: str,
        accept_license: bool = False,
        user: str | None = None,
        signed_in: UserCredential | None = None,
        private: bool = False,
    ) -> SearchCheck:
        """Validate a search file and check its models and data on the Hub; never raises for user errors.

        ``user``, ``signed_in`` and ``private`` as for :meth:`check`.
        """
        from bot.evolve import SearchLimits, check_search_file, preflight_search, searched_dimensions

        if signed_in is not None:
            user = signed_in.user
        limits = SearchLimits.of(self.bot.settings)

        problems: list[str] = []
        name_problem = _valid_name(name)
        destination = self.destination(name, user) if name_problem is None else ""
        if name_problem:
            problems.append(name_problem)
        try:
            _, spec, data_ref = check_search_file(search_yaml, limits=limits)
        except (BotError, MergeError) as exc:
            return SearchCheck(problems=(*problems, str(exc)), destination=destination)
        if destination and self.bot.destination_taken(destination):
            problems.append(f"`{destination}` already exists; choose another name.")
        try:
            preflight_search(
                self.bot.hub,
                search_yaml,
                accept_license=accept_license,
                name=name or "evolved",
                endpoint=self.bot.settings.hf_endpoint,
                token=self.bot.settings.hf_token.get_secret_value(),
                limits=limits,
                rights=Rights(signed_in.token) if signed_in else ANONYMOUS,
                private=private,
            )
        except (BotError, MergeError) as exc:
            problems.append(str(exc))
        return SearchCheck(
            problems=tuple(problems),
            method=spec.method,
            dimensions=tuple(searched_dimensions(spec)),
            trials=spec.budget.trials or 0,
            baselines=tuple(spec.baselines),
            evaluation=f"{spec.evaluation.kind} on `{data_ref}`" + _validation_note(spec.evaluation),
            destination=destination,
        )

    def submit_search(
        self,
        search_yaml: str,
        *,
        name: str,
        private: bool = False,
        accept_license: bool = False,
        requester: str | None = None,
        signed_in: UserCredential | None = None,
    ) -> Job:
        """Queue an evolutionary search in the bot's queue (the same as `@mergebot evolve`).

        Raises:
            engine.MergeError, bot.errors.BotError: the search is refused; nothing was queued.
        """
        job = self.bot.evolve(
            search_yaml,
            name=name,
            user=self._submitter(name, requester, signed_in),
            private=private,
            accept_license=accept_license,
            signed_in=signed_in,
        )
        log.info("evolve job %s queued from the Space: %s", job.id, job.spec.destination)
        return job

    def _submitter(self, name: str, requester: str | None, signed_in: UserCredential | None) -> str:
        """Who submits: the checks every submission passes first (name, then the sign-in's token)."""
        problem = _valid_name(name)
        if problem:
            raise DestinationError(problem)
        if signed_in is None:
            return requester if requester is not None and is_guest(requester) else new_guest()
        self._confirm(signed_in)
        return signed_in.user

    # -- cancel and resume ----------------------------------------------------------------

    def may_cancel(self, job: Job, *, user: str | None, session_jobs: Collection[str] = ()) -> bool:
        """A job may be cancelled by its signed-in requester, or from the page session that submitted it."""
        if user is not None and not is_guest(user) and job.spec.requester == user:
            return True  # a Hub user name never holds ':', so no account can pass for a guest
        return job.id in session_jobs

    def cancel(self, job_id: str, *, user: str | None, session_jobs: Collection[str] = ()) -> str:
        """Cancel a waiting job, or stop a running one (it publishes nothing); returns what to show.

        Raises:
            bot.errors.JobNotFound: no such job, or not one this visitor may cancel.
        """
        job_id = job_id.strip()
        job = self.bot.store.get(job_id)
        if job is None or not self.may_cancel(job, user=user, session_jobs=session_jobs):
            raise JobNotFound(job_id)
        return self.bot.cancel_job(job_id)

    def resume(self, job_id: str, signed_in: UserCredential) -> Job:
        """Resume a job that waits for its requester to sign in again, with the new sign-in's token.

        Raises:
            bot.errors.JobNotFound: no such job of this user. DestinationError: it is not waiting
            for a sign-in, or the sign-in cannot be confirmed.
        """
        job_id = job_id.strip()
        job = self.bot.store.get(job_id)
        if job is None or job.spec.requester != signed_in.user:
            raise JobNotFound(job_id)
        if job.state != "needs_sign_in":
            raise DestinationError(f"Job `{job_id}` is {job.state}; only a job waiting for sign-in resumes.")
        self._confirm(signed_in)
        self.bot.credentials.put(job_id, signed_in)
        if not self.bot.store.resume_signed_in(job_id):
            self.bot.credentials.drop(job_id)
            raise DestinationError(f"Job `{job_id}` changed state; reload the queue.")
        self.bot.queue.schedule(job_id)
        log.info("job %s resumed by its requester", job_id)
        resumed = self.bot.store.get(job_id)
        assert resumed is not None
        return resumed

    # -- queue ----------------------------------------------------------------------------

    def jobs(
        self, *, viewer: str | None = None, session_jobs: Collection[str] = ()
    ) -> list[tuple[Job, int | None]]:
        """Every job, newest first, with its place in the queue (None once finished).

        A private job's requester, destination and recipe are shown only to that requester (signed in as
        ``viewer``) or to the page session that submitted it (``session_jobs``); guests are shown
        as ``guest``, never by their session's identity.
        """
        jobs = self.bot.store.all()
        return [
            (self._as_seen(j, viewer, session_jobs), self.bot.store.queue_position(j.id)) for j in reversed(jobs)
        ]

    def _as_seen(self, job: Job, viewer: str | None, session_jobs: Collection[str]) -> Job:
        owner = job.id in session_jobs or (viewer is not None and not is_guest(viewer) and job.spec.requester == viewer)
        if job.spec.private and not owner:
            hidden: dict[str, object] = {
                "requester": PRIVATE,
                "destination": PRIVATE,
                "recipe_yaml": "",
                "parents": {},
                "search_yaml": None,
            }
            return dataclasses.replace(job, spec=job.spec.model_copy(update=hidden))
        if is_guest(job.spec.requester):
            return dataclasses.replace(job, spec=job.spec.model_copy(update={"requester": "guest"}))
        return job

    def notes(self) -> Mapping[str, str]:
        """Each running job's latest progress line (an evolve job's trial and best score)."""
        return self.bot.store.notes()
