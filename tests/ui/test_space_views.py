"""The page's view models, from the bot's frozen values (no browser, no Hub)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from bot.jobs import Job, JobSpec
from bot.licenses import ParentLicense, decide
from engine.check import Audit, Mismatch, ModelReport
from space.service import CheckReport
from space.views import (
    card_preview,
    compat_html,
    compat_rows,
    license_markdown,
    queue_html,
    queue_rows,
    summary_markdown,
)


def report(model: str, hidden: int, vocab: int = 256) -> ModelReport:
    return ModelReport(model, "LlamaForCausalLM", 4, hidden, 4, 2, vocab, "bfloat16", 180_800)


def test_compat_rows_mark_the_column_that_disagrees_on_every_row() -> None:
    audit = Audit(
        (report("org/base@abc", 64), report("org/wide", 96)),
        (Mismatch("hidden_size", {"org/base@abc": 64, "org/wide": 96}),),
        None,
    )
    rows = compat_rows(audit)
    assert [r.cells for r in rows] == [
        ("org/base", "LlamaForCausalLM", "4", "64", "256", "180,800"),
        ("org/wide", "LlamaForCausalLM", "4", "96", "256", "180,800"),
    ]
    assert all(r.mismatched == {"hidden size"} for r in rows)
    shown = compat_html(audit)
    assert shown.count("mb-bad'>✗") == 2 and "hidden_size differs" in shown


def test_compatible_models_show_no_mismatch() -> None:
    audit = Audit((report("a", 64), report("b", 64)), (), None)
    assert all(not r.mismatched for r in compat_rows(audit))
    assert "compatible" in compat_html(audit) and "mb-bad'" not in compat_html(audit)


def test_license_view_gives_the_licence_and_every_reason() -> None:
    allowed = decide([ParentLicense("org/base", "apache-2.0"), ParentLicense("org/chat", "cc-by-nc-4.0")])
    text = license_markdown(allowed)
    assert "Allowed" in text and "cc-by-nc-4.0" in text and "Non-commercial use only" in text
    refused = decide([ParentLicense("org/base", "apache-2.0"), ParentLicense("org/nd", "cc-by-nd-4.0")])
    text = license_markdown(refused)
    assert "Refused" in text and "forbids derivatives" in text
    vendor = decide([ParentLicense("org/base", "llama3")], model_name="my-merge")
    assert 'start with "Llama"' in license_markdown(vendor)


def test_summary_gives_size_and_time_or_the_problems() -> None:
    ok = CheckReport(destination="bot/m", bytes_to_read=120_000_000, bytes_to_write=361_600)
    assert (
        "bot/m" in summary_markdown(ok)
        and "361.6 kB" in summary_markdown(ok)
        and "2 s" in summary_markdown(ok)
    )
    bad = CheckReport(problems=("`x/y` does not exist on the Hub, or the bot cannot see it.",))
    assert "cannot be submitted" in summary_markdown(bad) and "`x/y` does not exist" in summary_markdown(bad)
    note = "parameters.nomalize (line 4): parameter 'nomalize' has no effect (did you mean 'normalize'?)"
    assert summary_markdown(CheckReport(destination="bot/m", notes=(note,))).endswith(f"\n- note: {note}")
    assert f"\n- note: {note}" in summary_markdown(CheckReport(problems=("bad",), notes=(note,)))
    assert "note:" not in summary_markdown(ok)


def test_card_preview_drops_the_front_matter() -> None:
    assert card_preview("---\nlicense: mit\n---\n\n# name\n") == "# name\n"
    assert card_preview("# no front matter\n") == "# no front matter\n"


def job(job_id: str, state: str, progress: float = 0.0, **more: object) -> Job:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    spec = JobSpec(requester="alice", destination=f"bot/{job_id}", recipe_yaml="", parents={})
    base = Job(job_id, spec, "queued", progress, None, None, None, False, now, now)
    return replace(base, state=state, **more)  # type: ignore[arg-type]


def test_queue_rows_give_place_progress_status_and_link() -> None:
    jobs = [
        (job("j1", "succeeded", 1.0, result_commit="0123456789abcdef"), None),
        (job("j2", "running", 0.42), 0),
        (job("j3", "queued"), 1),
        (job("j4", "queued"), 2),
        (job("j5", "failed", 0.3, reason="The models are not compatible"), None),
    ]
    rows = queue_rows(jobs, "http://hub/")
    assert [r.place for r in rows] == ["–", "merging now", "next", "#2 in line", "–"]
    assert [r.percent for r in rows] == [100, 42, 0, 0, 30]
    assert rows[0].link == "http://hub/bot/j1" and rows[0].detail == "commit 0123456789ab"
    assert all(r.link is None for r in rows[1:])
    assert rows[4].detail == "The models are not compatible"
    shown = queue_html(rows)
    assert "aria-valuenow='42'" in shown and "href='http://hub/bot/j1/resolve/main/README.md'" in shown
    assert "No merges yet" in queue_html(())


def test_queue_html_escapes_what_users_wrote() -> None:
    rows = queue_rows([(job("j9", "failed", reason="<script>x</script>"), None)], "http://hub")
    assert "<script>" not in queue_html(rows)


def test_queue_rows_show_search_trials_and_jobs_waiting_for_sign_in() -> None:
    running = job("e1", "running", 0.4)
    search = replace(running, spec=running.spec.model_copy(update={"kind": "evolve"}))
    held = job("h1", "needs_sign_in", reason="the bot restarted; sign in again to resume, or cancel")
    rows = queue_rows([(search, 0), (held, None)], "http://hub", {"e1": "trial 2/5 (search), best 12.3"})
    assert rows[0].kind == "evolve" and rows[0].place == "searching now"
    assert rows[0].detail == "trial 2/5 (search), best 12.3" and rows[0].percent == 40
    assert rows[1].kind == "merge" and rows[1].place == "paused" and "sign in again" in rows[1].detail
    shown = queue_html(rows)
    assert "<td>evolve</td>" in shown and "⏸ sign in again to resume" in shown
