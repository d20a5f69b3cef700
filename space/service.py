"""The Space's thin adapter over the bot: check a recipe, submit it to the bot's queue, list jobs.

It adds no merge logic. ``check`` gathers the same facts as ``bot.worker.preflight`` but keeps
going after a problem, so the page can show every row of the compatibility table and the
licence verdict together; ``submit`` runs the bot's own ``preflight`` (which refuses what the
check refused) and enters the job in the bot's store and scheduler, the queue the discussion
commands use.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from bot.cards import build_context, render_card
from bot.errors import BotError, DestinationError, QuotaError
from bot.hub import Lineage, RepoFacts
from bot.jobs import Job, JobSpec
from bot.licenses import LicenseVerdict, ParentLicense, decide
from bot.service import Bot
from bot.worker import READ_BYTES_PER_S, hub_repo, preflight
from engine import MergeConfig, MergeError, MergeOptions, RecipeError, build_plan, load_recipe
from engine.check import Audit, audit_models
from engine.run import OpenModels

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
GUEST = "space-guest"


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

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def seconds_estimate(self) -> float:
        return self.bytes_to_read / READ_BYTES_PER_S


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

    def namespace(self) -> str:
        """Where merges are published: the bot's account (or the Space's organisation)."""
        return self.bot.name or self.bot.hub.whoami()

    def destination(self, name: str) -> str:
        return f"{self.namespace()}/{name}"

    def repo_url(self, repo_id: str) -> str:
        return self.bot.hub.repo_url(repo_id)

    # -- check ----------------------------------------------------------------------------

    def check(self, recipe_yaml: str, *, name: str, accept_license: bool = False) -> CheckReport:
        """The preflight report for a recipe; never raises for anything a user can cause."""
        try:
            config = load_recipe(recipe_yaml if recipe_yaml.endswith("\n") else recipe_yaml + "\n")
        except RecipeError as exc:
            return CheckReport(problems=(f"The recipe is not valid:\n{exc}",))
        problems: list[str] = []
        name_problem = _valid_name(name)
        destination = self.destination(name) if name_problem is None else ""
        if name_problem:
            problems.append(name_problem)
        elif self.bot.store.active_for(destination) or self.bot.hub.repo_exists(destination):
            problems.append(f"`{destination}` already exists; choose another name.")
        facts: dict[str, RepoFacts] = {}
        for ref in config.referenced_models():
            try:
                repo_id, revision = hub_repo(ref)
                facts.setdefault(repo_id, self.bot.hub.repo_facts(repo_id, revision))
            except BotError as exc:
                problems.append(str(exc))
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
        if len(facts) == len({hub_repo(r)[0] for r in config.referenced_models()}):
            options = MergeOptions(
                hub_endpoint=self.bot.settings.hf_endpoint,
                hub_token=self.bot.settings.hf_token.get_secret_value(),
                device="cpu",
            )
            try:
                with OpenModels(config, options) as opened:
                    metadata = opened.metadata()
                    audit = audit_models(config, metadata)
                    if audit.ok:
                        plan = build_plan(config, metadata)
                        read, write = plan.bytes_to_read, plan.bytes_to_write
            except MergeError as exc:
                problems.append(str(exc))
        if audit is not None:
            problems.extend(f"The models do not agree: {m}." for m in audit.mismatches)
            if audit.plan_error and not audit.mismatches:
                problems.append(audit.plan_error)
        card = ""
        if facts:
            lineage = self._lineage(list(facts))
            context = build_context(
                repo_id=destination or f"{self.namespace()}/{name or 'your-merge'}",
                requester=self.namespace(),
                bot_name=self.namespace(),
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
    ) -> Job:
        """Queue the merge in the bot's queue, after the bot's own preflight.

        Raises:
            engine.RecipeError, engine.MergeError, bot.errors.BotError: the merge is refused
            (the message says why); nothing was queued.
        """
        user = requester or GUEST
        problem = _valid_name(name)
        if problem:
            raise DestinationError(problem)
        if self.bot.store.active_count(user) >= self.bot.settings.max_jobs_per_user:
            raise QuotaError(user, self.bot.settings.max_jobs_per_user)
        destination = self.destination(name)
        if self.bot.store.active_for(destination) or self.bot.hub.repo_exists(destination):
            raise DestinationError(f"`{destination}` already exists; choose another name.")
        pre = preflight(
            self.bot.hub,
            recipe_yaml,
            accept_license=accept_license,
            name=name,
            endpoint=self.bot.settings.hf_endpoint,
            token=self.bot.settings.hf_token.get_secret_value(),
        )
        spec = JobSpec(
            kind="merge",
            requester=user,
            destination=destination,
            recipe_yaml=pre.config.to_yaml(),
            parents={repo: f.sha for repo, f in pre.facts.items()},
            private=private,
            accept_license=accept_license,
        )
        job = self.bot.store.add(spec)
        self.bot.queue.schedule(job.id)
        log.info("job %s queued from the Space: %s for %s", job.id, destination, user)
        return job

    # -- queue ----------------------------------------------------------------------------

    def jobs(self) -> list[tuple[Job, int | None]]:
        """Every job, newest first, with its place in the queue (None once finished)."""
        jobs = self.bot.store.all()
        return [(j, self.bot.store.queue_position(j.id)) for j in reversed(jobs)]
