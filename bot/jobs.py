"""The job store (SQLAlchemy: SQLite by default) and the scheduler (APScheduler 3.x) that runs one merge at a time.

The ``jobs`` table is the truth about every job; APScheduler's persisted job store only
says *when* to run one. A job is claimed atomically (``queued -> running``), so a job
handed to the executor twice runs once. On start, jobs left ``running`` by a dead process
go back to ``queued`` and every queued job is scheduled again.

States::

    queued --> running --> succeeded
      |  ^        |------> failed (reason)
      |  |        '------> cancelled <--.
      v  | resume                       |
    needs_sign_in ----------------------'

Fair turns: whichever job the executor is handed, it runs the queued job of the requester with the
fewest jobs started in the last :data:`FAIR_WINDOW` (the Space's anonymous visitors count as one
requester), the oldest of that requester's; so one requester's long queue cannot block the others.

``needs_sign_in``: the job publishes with a signed-in user's token (``spec.credential == "user"``),
which lives only in the memory of the process that took it (:mod:`bot.credentials`); a restarted
process has lost it, so the job waits there until the same user signs in again, or cancels it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

State = Literal["queued", "running", "needs_sign_in", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[State, ...] = ("queued", "running", "needs_sign_in")
JobKind = Literal["merge", "remerge", "evolve"]
Credential = Literal["bot", "user"]  # whose token publishes the result (never the token itself)
SIGN_IN_AGAIN = "the bot restarted and forgot your sign-in; sign in again to resume, or cancel"
SIGN_IN_EXPIRED = "your sign-in expired or was revoked; sign in again to resume, or cancel"
FAIR_WINDOW = timedelta(hours=24)
# An anonymous Space visitor's identity: one per page session, never a Hub user name (those hold no ':').
GUEST_PREFIX = "guest:"


def new_guest() -> str:
    """A fresh identity for one anonymous page session."""
    return GUEST_PREFIX + secrets.token_urlsafe(12)


def is_guest(requester: str) -> bool:
    return requester.startswith(GUEST_PREFIX)


def _fair_group(requester: str) -> str:
    return GUEST_PREFIX if is_guest(requester) else requester


class ReportTo(BaseModel):
    """The discussion a job reports to."""

    model_config = ConfigDict(frozen=True)

    repo_id: str
    num: int


class JobSpec(BaseModel):
    """Everything needed to run a job, with every parent pinned to a commit: JSON in, JSON out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: JobKind = "merge"
    requester: str
    destination: str
    recipe_yaml: str  # every model reference is `org/name@sha` ("" for an evolve job)
    parents: dict[str, str]  # repo id -> pinned sha, base first
    private: bool = False
    accept_license: bool = False
    report: ReportTo | None = None
    source_comment: str | None = None
    credential: Credential = "bot"
    search_yaml: str | None = None  # evolve: the search file, models pinned as `org/name@sha`
    force: bool = False  # publish even if the merge fails its quality check


@dataclass(frozen=True)
class Job:
    id: str
    spec: JobSpec
    state: State
    progress: float
    reason: str | None
    status_comment: str | None
    result_commit: str | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime


_meta = sa.MetaData()
_jobs = sa.Table(
    "mergebot_jobs",
    _meta,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("requester", sa.String(200), nullable=False, index=True),
    sa.Column("destination", sa.String(300), nullable=False, index=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("reason", sa.Text),
    sa.Column("status_comment", sa.String(100)),
    sa.Column("result_commit", sa.String(64)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
# One line saying where a running job is ("trial 3/5, best 12.3"): a table of its own, so a job
# store made before it existed gains it from create_all, with no migration.
_notes = sa.Table(
    "mergebot_notes",
    _meta,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
)
# When each job was taken from the queue, and for whom: what fair turns count.
_starts = sa.Table(
    "mergebot_starts",
    _meta,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("requester", sa.String(200), nullable=False, index=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, index=True),
)
_seen = sa.Table(
    "mergebot_seen",
    _meta,
    sa.Column("key", sa.String(300), primary_key=True),
    sa.Column("payload", sa.Text),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


def _now() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str) -> sa.Engine:
    """An engine for the store; SQLite gets WAL and a busy timeout, since several threads write."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return sa.create_engine(url)


class JobStore:
    """Jobs and the keys of deliveries and comments already handled."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        _meta.create_all(engine)
        self._lock = threading.Lock()  # one writer at a time inside this process

    # -- jobs ---------------------------------------------------------------------------

    def add(self, spec: JobSpec) -> Job:
        now = _now()
        job_id = uuid.uuid4().hex[:12]
        with self._lock, self.engine.begin() as conn:
            seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(_jobs.c.seq), 0) + 1)).scalar_one()
            conn.execute(
                _jobs.insert().values(
                    id=job_id,
                    seq=seq,
                    requester=spec.requester,
                    destination=spec.destination,
                    spec=spec.model_dump_json(),
                    state="queued",
                    progress=0.0,
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                )
            )
        job = self.get(job_id)
        assert job is not None
        return job

    def _row(self, row: Any) -> Job:
        def aware(moment: datetime) -> datetime:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

        return Job(
            id=row.id,
            spec=JobSpec.model_validate_json(row.spec),
            state=row.state,
            progress=row.progress,
            reason=row.reason,
            status_comment=row.status_comment,
            result_commit=row.result_commit,
            cancel_requested=bool(row.cancel_requested),
            created_at=aware(row.created_at),
            updated_at=aware(row.updated_at),
        )

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(_jobs).where(_jobs.c.id == job_id)).first()
        return self._row(row) if row else None

    def all(self, *, requester: str | None = None, states: Sequence[State] | None = None) -> list[Job]:
        query = sa.select(_jobs).order_by(_jobs.c.seq)
        if requester is not None:
            query = query.where(_jobs.c.requester == requester)
        if states is not None:
            query = query.where(_jobs.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(query)]

    def active_count(self, requester: str) -> int:
        return len(self.all(requester=requester, states=ACTIVE))

    def active_guest_count(self) -> int:
        """Jobs waiting or running for anonymous visitors, all of them together."""
        query = sa.select(sa.func.count()).where(
            _jobs.c.requester.startswith(GUEST_PREFIX, autoescape=True), _jobs.c.state.in_(list(ACTIVE))
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def all_for(self, destination: str, states: Sequence[State] | None = None) -> list[Job]:
        """Jobs that publish to ``destination``, oldest first."""
        query = sa.select(_jobs).where(_jobs.c.destination == destination).order_by(_jobs.c.seq)
        if states is not None:
            query = query.where(_jobs.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(query)]

    def active_for(self, destination: str) -> list[Job]:
        return self.all_for(destination, ACTIVE)

    def queue_position(self, job_id: str) -> int | None:
        """1 for the next job to run in fair order (0 while running); None when the job is finished."""
        job = self.get(job_id)
        if job is None or job.state not in ACTIVE:
            return None
        if job.state == "running":
            return 0
        if job.state == "needs_sign_in":
            return None
        order = self.fair_order()
        return order.index(job_id) + 1 if job_id in order else None

    def _update(self, job_id: str, *conditions: Any, **values: Any) -> bool:
        with self._lock, self.engine.begin() as conn:
            result = conn.execute(
                _jobs.update().where(_jobs.c.id == job_id, *conditions).values(updated_at=_now(), **values)
            )
            return bool(result.rowcount)

    def claim(self, job_id: str) -> bool:
        """queued -> running; False if the job is not queued (already taken, finished or cancelled)."""
        with self._lock, self.engine.begin() as conn:
            now = _now()
            taken = conn.execute(
                _jobs.update()
                .where(_jobs.c.id == job_id, _jobs.c.state == "queued")
                .values(updated_at=now, state="running", progress=0.0)
            ).rowcount
            if taken:
                requester = conn.execute(sa.select(_jobs.c.requester).where(_jobs.c.id == job_id)).scalar_one()
                conn.execute(sa.delete(_starts).where(_starts.c.job_id == job_id))
                conn.execute(_starts.insert().values(job_id=job_id, requester=requester, started_at=now))
            return bool(taken)

    def fair_order(self, now: datetime | None = None) -> list[str]:
        """The queued jobs in the order they will run: each turn goes to the requester with the fewest
        starts in :data:`FAIR_WINDOW` (guests count as one), then to the oldest job."""
        since = (now or _now()) - FAIR_WINDOW
        with self.engine.connect() as conn:
            waiting = [
                (str(r.id), _fair_group(r.requester))
                for r in conn.execute(
                    sa.select(_jobs.c.id, _jobs.c.requester).where(_jobs.c.state == "queued").order_by(_jobs.c.seq)
                )
            ]
            started: dict[str, int] = {}
            for (requester,) in conn.execute(sa.select(_starts.c.requester).where(_starts.c.started_at >= since)):
                group = _fair_group(requester)
                started[group] = started.get(group, 0) + 1
        order = []
        while waiting:
            best = min(range(len(waiting)), key=lambda i: (started.get(waiting[i][1], 0), i))
            job_id, group = waiting.pop(best)
            order.append(job_id)
            started[group] = started.get(group, 0) + 1
        return order

    def next_fair(self, now: datetime | None = None) -> str | None:
        """The queued job to run next (the first of :meth:`fair_order`); None when nothing waits."""
        order = self.fair_order(now)
        return order[0] if order else None

    def claim_next(self) -> str | None:
        """Claim the job :meth:`next_fair` names; None when nothing waits."""
        while (job_id := self.next_fair()) is not None:
            if self.claim(job_id):
                return job_id
        return None

    def set_progress(self, job_id: str, fraction: float, note: str | None = None) -> None:
        """Record how far a running job is, and optionally a one-line note (never a secret)."""
        self._update(job_id, _jobs.c.state == "running", progress=fraction)
        if note is not None:
            with self._lock, self.engine.begin() as conn:
                if (
                    conn.execute(_notes.update().where(_notes.c.job_id == job_id).values(text=note)).rowcount
                    == 0
                ):
                    conn.execute(_notes.insert().values(job_id=job_id, text=note))

    def notes(self) -> dict[str, str]:
        """job id -> its latest progress note."""
        with self.engine.connect() as conn:
            return {r.job_id: r.text for r in conn.execute(sa.select(_notes))}

    def finish(
        self, job_id: str, state: State, *, reason: str | None = None, commit: str | None = None
    ) -> None:
        values: dict[str, Any] = {"state": state, "reason": reason, "result_commit": commit}
        if state == "succeeded":
            values["progress"] = 1.0
        self._update(job_id, **values)

    def set_status_comment(self, job_id: str, comment_id: str) -> None:
        self._update(job_id, status_comment=comment_id)

    def cancel(self, job_id: str) -> State | None:
        """Cancel a waiting job at once, or ask a running one to stop; returns the state it was in."""
        job = self.get(job_id)
        if job is None or job.state not in ACTIVE:
            return job.state if job else None
        for waiting in ("queued", "needs_sign_in"):
            if self._update(
                job_id, _jobs.c.state == waiting, state="cancelled", reason="cancelled by the requester"
            ):
                return waiting
        self._update(job_id, _jobs.c.state == "running", cancel_requested=True)
        return "running"

    def hold_for_sign_in(self, job_id: str, reason: str = SIGN_IN_AGAIN) -> bool:
        """queued/running -> needs_sign_in: the user's token is gone (restart) or no longer valid."""
        return self._update(
            job_id,
            _jobs.c.state.in_(["queued", "running"]),
            state="needs_sign_in",
            progress=0.0,
            reason=reason,
            cancel_requested=False,
        )

    def resume_signed_in(self, job_id: str) -> bool:
        """needs_sign_in -> queued, once the user has signed in again."""
        return self._update(job_id, _jobs.c.state == "needs_sign_in", state="queued", reason=None)

    def requeue(self, job_id: str) -> None:
        """running -> queued (the bot stopped in the middle; the job starts again on the next run)."""
        self._update(job_id, _jobs.c.state == "running", state="queued", progress=0.0)

    def requeue_running(self) -> list[str]:
        """Jobs a dead process left running go back to the queue (they restart from scratch)."""
        ids = [j.id for j in self.all(states=("running",))]
        for job_id in ids:
            self.requeue(job_id)
        return ids

    def latest_results(self) -> list[Job]:
        """For each destination repo, its most recent succeeded merge (what a re-merge starts from).

        Evolved repos are left out: re-running a search because a parent moved is not a re-merge.
        """
        latest: dict[str, Job] = {}
        for job in self.all(states=("succeeded",)):
            if job.spec.kind != "evolve":
                latest[job.spec.destination] = job
        return list(latest.values())

    # -- keys already handled -------------------------------------------------------------

    def remember(self, key: str, payload: dict[str, Any] | None = None) -> bool:
        """Record ``key``; False if it was already recorded (a duplicate)."""
        with self._lock, self.engine.begin() as conn:
            if conn.execute(sa.select(_seen.c.key).where(_seen.c.key == key)).first():
                return False
            conn.execute(
                _seen.insert().values(
                    key=key,
                    payload=json.dumps(payload) if payload is not None else None,
                    done=False,
                    created_at=_now(),
                )
            )
            return True

    def mark_done(self, key: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(_seen.update().where(_seen.c.key == key).values(done=True))

    def pending(self) -> list[tuple[str, dict[str, Any]]]:
        """Deliveries received but not yet handled (the process died in between), oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(_seen.c.key, _seen.c.payload)
                .where(_seen.c.done.is_(False), _seen.c.payload.is_not(None))
                .order_by(_seen.c.created_at)
            )
            return [(r.key, json.loads(r.payload)) for r in rows]


# APScheduler persists a job as a textual reference to a function plus its arguments; the
# function finds the process's runner for that store here (registered by JobQueue.start).
_RUNNERS: dict[str, Callable[[str], None]] = {}


def run_registered(queue_key: str, job_id: str) -> None:
    """The persisted entry point: run ``job_id`` with the runner registered for ``queue_key``."""
    runner = _RUNNERS.get(queue_key)
    if runner is None:
        log.warning("no runner for job %s: the queue is stopped", job_id)
        return
    runner(job_id)


class _RunningCount:
    """How many calls wrapped by :meth:`tracked` are running, and a wait for none to be."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()
        self._inside = threading.local()

    def tracked(self, fn: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            with self._idle:
                self._count += 1
            self._inside.depth = getattr(self._inside, "depth", 0) + 1
            try:
                fn(*args)
            finally:
                self._inside.depth -= 1
                with self._idle:
                    self._count -= 1
                    self._idle.notify_all()

        return run

    def wait_idle(self) -> None:
        """Wait until no tracked call runs but the caller's own (a call may stop its own queue)."""
        own = getattr(self._inside, "depth", 0)
        with self._idle:
            self._idle.wait_for(lambda: self._count <= own)


class JobQueue:
    """APScheduler around the store: merges one at a time, light work (events, polls) beside them."""

    def __init__(self, store: JobStore, url: str, runner: Callable[[str], None]) -> None:
        self.store = store
        self._key = hashlib.sha256(url.encode()).hexdigest()[:16]
        self._runner = runner
        self._run_jobs = True
        self._running = _RunningCount()
        self.scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=store.engine), "memory": MemoryJobStore()},
            executors={
                "default": ThreadPoolExecutor(max_workers=1),
                "light": ThreadPoolExecutor(max_workers=1),
            },
            job_defaults={"misfire_grace_time": None, "coalesce": False, "max_instances": 1},
            timezone=UTC,
        )

    def start(self, *, run_jobs: bool = True) -> list[str]:
        """Start; re-queue what a dead process left running and schedule every queued job again.

        ``run_jobs=False`` keeps merges waiting (the queue still fills): for maintenance and tests.
        """
        requeued = self.store.requeue_running()
        if requeued:
            log.info("re-queued %d job(s) left running by a previous process", len(requeued))
        _RUNNERS[self._key] = self._running.tracked(self._runner)
        self._run_jobs = run_jobs
        self.scheduler.start()
        for job in self.store.all(states=("queued",)):
            self.schedule(job.id)
        return requeued

    def schedule(self, job_id: str) -> None:
        """Have ``job_id`` run when the executor is free (held back while merges are paused)."""
        extra: dict[str, Any] = {} if self._run_jobs else {"next_run_time": None}
        self.scheduler.add_job(
            run_registered,
            **extra,
            args=(self._key, job_id),
            id=job_id,
            replace_existing=True,
            jobstore="default",
            executor="default",
            name=f"merge {job_id}",
        )

    def unschedule(self, job_id: str) -> None:
        if self.scheduler.get_job(job_id, jobstore="default") is not None:
            self.scheduler.remove_job(job_id, jobstore="default")

    def submit_light(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` soon on the light executor (not persisted)."""
        self.scheduler.add_job(self._running.tracked(fn), args=args, jobstore="memory", executor="light")

    def every(self, seconds: float, fn: Callable[[], None], name: str) -> None:
        self.scheduler.add_job(
            self._running.tracked(fn),
            "interval",
            seconds=seconds,
            jobstore="memory",
            executor="light",
            id=name,
            replace_existing=True,
        )

    def hold(self) -> None:
        """Keep the jobs scheduled from now on waiting, until :meth:`resume` (maintenance, tests)."""
        self._run_jobs = False

    def resume(self) -> None:
        """Let held-back merges run."""
        self._run_jobs = True
        for job in self.scheduler.get_jobs(jobstore="default"):
            job.resume()

    def stop(self, wait: bool = True) -> None:
        """Stop scheduling; with ``wait``, return once the work already running has finished.

        The scheduler is shut down without waiting, then the running work is awaited outside
        it: APScheduler waits for its executors while holding the lock that ``add_job`` takes,
        so work that schedules more (a delivery queueing a merge) would deadlock a waiting
        shutdown. Work scheduled once stopping has begun is dropped.
        """
        _RUNNERS.pop(self._key, None)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if wait:
            self._running.wait_idle()
