"""The job store and queue: states, positions, limits, cancellation, restart, and the persisted keys."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from botkit import BOT, BotFactory, World, finished_job, merge_command, wait_for

from bot.jobs import JobQueue, JobSpec, JobStore, ReportTo, make_engine, new_guest


def spec(user: str = "alice", dest: str = "bot/x") -> JobSpec:
    return JobSpec(
        requester=user,
        destination=dest,
        recipe_yaml="merge_method: linear\n",
        parents={"a/b": "0" * 40},
        report=ReportTo(repo_id="bot/requests", num=1),
    )


def test_states_positions_and_cancel(tmp_path: Path) -> None:
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'j.sqlite'}"))
    a, b, c = store.add(spec()), store.add(spec("bob")), store.add(spec())
    assert [store.queue_position(j.id) for j in (a, b, c)] == [1, 2, 3]
    assert store.active_count("alice") == 2
    assert store.claim(a.id) and not store.claim(a.id)  # claimed once
    assert store.queue_position(a.id) == 0 and store.queue_position(b.id) == 1
    assert store.cancel(b.id) == "queued" and store.get(b.id).state == "cancelled"  # type: ignore[union-attr]
    assert store.queue_position(c.id) == 1 and not store.claim(b.id)
    assert store.cancel(a.id) == "running" and store.get(a.id).cancel_requested  # type: ignore[union-attr]
    store.finish(a.id, "failed", reason="boom")
    assert store.get(a.id).reason == "boom" and store.queue_position(a.id) is None  # type: ignore[union-attr]
    assert store.cancel(a.id) == "failed"


def test_specs_round_trip_and_running_jobs_are_requeued(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'j.sqlite'}"
    store = JobStore(make_engine(url))
    job = store.add(spec())
    store.claim(job.id)
    store.set_progress(job.id, 0.4)
    again = JobStore(make_engine(url))  # a new process
    assert again.get(job.id).spec == job.spec  # type: ignore[union-attr]
    assert again.requeue_running() == [job.id] and again.get(job.id).state == "queued"  # type: ignore[union-attr]


def test_a_user_credential_job_waits_for_sign_in_after_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'j.sqlite'}"
    store = JobStore(make_engine(url))
    mine = spec().model_copy(update={"credential": "user", "destination": "alice/x"})
    waiting, running, bots = store.add(mine), store.add(mine), store.add(spec())
    store.claim(running.id)
    store.set_progress(running.id, 0.5, "trial 1/3, best 12")
    assert store.notes() == {running.id: "trial 1/3, best 12"}
    again = JobStore(make_engine(url))  # a new process: no credential held for them
    assert again.hold_for_sign_in(waiting.id) and again.hold_for_sign_in(running.id)
    held = again.get(running.id)
    assert held is not None and held.state == "needs_sign_in" and "sign in again" in (held.reason or "")
    assert held.progress == 0.0 and again.queue_position(held.id) is None
    assert again.queue_position(bots.id) == 1  # waiting for a sign-in holds nobody back
    assert again.active_count("alice") == 3 and not again.claim(held.id)
    assert again.resume_signed_in(held.id) and again.get(held.id).state == "queued"  # type: ignore[union-attr]
    assert again.cancel(waiting.id) == "needs_sign_in" and again.get(waiting.id).state == "cancelled"  # type: ignore[union-attr]
    assert not again.resume_signed_in(waiting.id)


def test_delivery_keys_persist(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'j.sqlite'}"
    store = JobStore(make_engine(url))
    assert store.remember("k", {"a": 1}) and not store.remember("k", {"a": 1})
    assert store.pending() == [("k", {"a": 1})]
    again = JobStore(make_engine(url))
    assert not again.remember("k")
    again.mark_done("k")
    assert again.pending() == []


def test_one_merge_at_a_time_and_restart_reschedules(tmp_path: Path) -> None:
    import threading
    import time

    url = f"sqlite:///{tmp_path / 'j.sqlite'}"
    store = JobStore(make_engine(url))
    active, seen, lock = [0], [0], threading.Lock()

    def runner(job_id: str) -> None:
        if not store.claim(job_id):
            return
        with lock:
            active[0] += 1
            seen[0] = max(seen[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        store.finish(job_id, "succeeded", commit="c")

    ids = [store.add(spec(dest=f"bot/{i}")).id for i in range(4)]
    paused = JobQueue(store, url, runner)
    paused.start(run_jobs=False)
    for job_id in ids:
        paused.schedule(job_id)
    time.sleep(0.2)
    assert all(store.get(i).state == "queued" for i in ids)  # type: ignore[union-attr]
    paused.stop()
    queue = JobQueue(store, url, runner)  # a restart: queued jobs are scheduled again
    queue.start()
    try:
        wait_for(lambda: all(store.get(i).state == "succeeded" for i in ids), 10, "the jobs")  # type: ignore[union-attr]
    finally:
        queue.stop()
    assert seen[0] == 1


def test_cancel_a_running_merge_publishes_nothing(
    world: World, serve_bot: BotFactory, big_models: tuple[str, str]
) -> None:
    server = serve_bot()
    base, ft = big_models
    recipe = f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n"
    num = world.alice.create_discussion(
        f"{BOT}/requests", "cancel me", description=merge_command("cancelled-run", recipe)
    ).num
    wait_for(
        lambda: [j for j in server.bot.store.all(states=("running",)) if j.progress > 0.05],
        60,
        "a running merge",
    )
    world.alice.comment_discussion(f"{BOT}/requests", num, f"@{BOT} cancel")
    job = finished_job(server.bot, f"{BOT}/cancelled-run")
    assert job.state == "cancelled"
    assert not world.alice.repo_exists(f"{BOT}/cancelled-run")
    wait_for(
        lambda: any(
            "was cancelled" in getattr(e, "content", "")
            for e in world.alice.get_discussion_details(f"{BOT}/requests", num).events
        ),
        what="the cancelled status",
    )


def test_public_api() -> None:
    import bot

    assert sorted(bot.__all__) == ["Bot", "BotError", "Settings", "create_app"]
    for name in bot.__all__:
        assert hasattr(bot, name)


def test_stopping_the_bot_requeues_a_running_merge(
    world: World, serve_bot: BotFactory, big_models: tuple[str, str]
) -> None:
    server = serve_bot()
    base, ft = big_models
    recipe = f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n"
    world.alice.create_discussion(
        f"{BOT}/requests", "stop me", description=merge_command("stopped-run", recipe)
    )
    (running,) = wait_for(
        lambda: [j for j in server.bot.store.all(states=("running",)) if j.progress > 0.05],
        60,
        "a running merge",
    )
    server.bot.stop()
    assert server.bot.store.get(running.id).state == "queued"  # type: ignore[union-attr]
    assert not world.alice.repo_exists(f"{BOT}/stopped-run")


def test_the_cli_needs_its_environment(capsys: pytest.CaptureFixture[str]) -> None:
    from bot.cli import main

    assert main(["serve"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])


def test_turns_are_fair_between_requesters(tmp_path: Path) -> None:
    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'j.sqlite'}"))
    guest_x, guest_y = new_guest(), new_guest()
    order = ["alice", "alice", "alice", "bob", guest_x, guest_y, "carol"]
    ids = {store.add(spec(user, f"bot/{i}")).id: user for i, user in enumerate(order)}
    expected = ["alice", "bob", guest_x, "carol", "alice", guest_y, "alice"]
    # each job's place in the queue says where it will run
    places = {store.queue_position(job_id): user for job_id, user in ids.items()}
    assert [places[p] for p in range(1, len(order) + 1)] == expected
    ran = []
    while (job_id := store.claim_next()) is not None:
        ran.append(ids[job_id])
        store.finish(job_id, "succeeded", commit="c")
    # alice's queue does not hold bob and carol back; the guests share one turn between them
    assert ran == expected


def test_turns_forget_starts_older_than_the_window(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from bot.jobs import FAIR_WINDOW

    store = JobStore(make_engine(f"sqlite:///{tmp_path / 'j.sqlite'}"))
    first = store.add(spec("alice", "bot/a1"))
    again = store.add(spec("alice", "bot/a2"))
    bob = store.add(spec("bob", "bot/b1"))
    assert store.claim_next() == first.id
    assert store.next_fair() == bob.id
    assert store.next_fair(datetime.now(UTC) + FAIR_WINDOW * 2) == again.id  # alice's start has aged out


def test_settings_bound_work_by_default() -> None:
    from bot.settings import Settings, SettingsError

    env = {"HF_TOKEN": "t", "WEBHOOK_SECRET": "s", "MERGEBOT_DATA": "/tmp/x"}
    default = Settings.from_env(env)
    assert default.max_merge_bytes == 20 * 10**9 and default.job_timeout_minutes == 120
    for off in ("0", "none", "None"):
        unbounded = Settings.from_env({**env, "MERGEBOT_MAX_MERGE_GB": off, "MERGEBOT_JOB_TIMEOUT_MINUTES": off})
        assert unbounded.max_merge_bytes is None and unbounded.job_timeout_minutes is None
    chosen = Settings.from_env({**env, "MERGEBOT_MAX_MERGE_GB": "1.5", "MERGEBOT_JOB_TIMEOUT_MINUTES": "30"})
    assert chosen.max_merge_bytes == 1_500_000_000 and chosen.job_timeout_minutes == 30
    for name in ("MERGEBOT_MAX_MERGE_GB", "MERGEBOT_JOB_TIMEOUT_MINUTES"):
        for bad in ("lots", "nan", "-1", "inf"):
            with pytest.raises(SettingsError, match=name):
                Settings.from_env({**env, name: bad})


def test_stopping_while_a_delivery_schedules_a_merge_does_not_deadlock(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'j.sqlite'}"
    store = JobStore(make_engine(url))
    queue = JobQueue(store, url, lambda job_id: None)
    queue.start(run_jobs=False)
    handling, release = threading.Event(), threading.Event()

    def delivery() -> None:  # a webhook handler that queues a merge once stopping has begun
        handling.set()
        release.wait(60)
        queue.schedule(store.add(spec()).id)

    queue.submit_light(delivery)
    assert handling.wait(60)
    stopper = threading.Thread(target=queue.stop, daemon=True)
    stopper.start()
    wait_for(lambda: not queue.scheduler.running, 60, "the scheduler stopping")
    release.set()
    stopper.join(60)
    assert not stopper.is_alive(), "stop() deadlocked with the handler it was waiting for"
