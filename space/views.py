"""View models: the bot's values turned into what the page shows (pure; no I/O, no Gradio).

Each function takes frozen values (a check report, a licence verdict, jobs) and returns
rows or markdown/HTML text, so the page's content is tested without a browser.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bot.jobs import Job
from bot.licenses import LicenseVerdict
from engine.check import Audit
from space.service import CheckReport, SearchCheck

COMPAT_HEADERS = ("model", "architecture", "layers", "hidden size", "vocab size", "parameters")
# audit field name -> column of the compatibility table
_FIELD_COLUMN = {
    "architecture": "architecture",
    "layers": "layers",
    "hidden_size": "hidden size",
    "vocab_size": "vocab size",
    "heads": "hidden size",
    "kv_heads": "hidden size",
}


@dataclass(frozen=True)
class CompatRow:
    cells: tuple[str, ...]
    mismatched: frozenset[str]  # columns that disagree with another model


def _number(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def compat_rows(audit: Audit) -> tuple[CompatRow, ...]:
    """One row per model; a column is marked on every row when the models disagree on it."""
    bad = frozenset(_FIELD_COLUMN[m.field] for m in audit.mismatches if m.field in _FIELD_COLUMN)
    rows = []
    for r in audit.reports:
        cells = (
            r.model.partition("@")[0],
            r.architecture,
            str(r.layers),
            _number(r.hidden_size),
            _number(r.vocab_size),
            _number(r.parameters),
        )
        rows.append(CompatRow(cells, bad))
    return tuple(rows)


def compat_html(audit: Audit | None) -> str:
    """The compatibility table, mismatching cells in red with a ✗."""
    if audit is None:
        return "<p class='mb-muted'>The models could not be read, so they were not compared.</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in COMPAT_HEADERS)
    body = []
    for row in compat_rows(audit):
        cells = []
        for header, cell in zip(COMPAT_HEADERS, row.cells, strict=True):
            if header in row.mismatched:
                cells.append(f"<td class='mb-bad'>✗ {html.escape(cell)}</td>")
            else:
                cells.append(f"<td>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if audit.ok:
        summary = "<p class='mb-good'>✓ The models are compatible: same architecture and shapes.</p>"
    else:
        named = "; ".join(html.escape(str(m)) for m in audit.mismatches) or html.escape(
            audit.plan_error or ""
        )
        summary = f"<p class='mb-bad-text'>✗ Mismatch: {named}</p>"
    return (
        f"{summary}<table class='mb-table' id='mb-compat'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def license_markdown(verdict: LicenseVerdict | None) -> str:
    """The licence verdict: allowed or refused, the resulting licence, and every reason."""
    if verdict is None:
        return ""
    shown = (
        f"{verdict.license_name} (other)"
        if verdict.license == "other" and verdict.license_name
        else verdict.license
    )
    if verdict.allowed:
        lines = [f"**✓ Allowed.** The merge will be published under **{shown}**."]
    else:
        lines = ["**✗ Refused by the licences.** The parents' terms do not allow this merge:"]
    if verdict.allowed and not verdict.commercial_use:
        lines.append("Non-commercial use only.")
    if verdict.gated:
        lines.append("The merge will be gated, like a parent.")
    lines += [f"- {r}" for r in verdict.reasons]
    if verdict.obligations:
        lines += ["", "Obligations passed on to users of the merge:"]
        lines += [f"- {o}" for o in verdict.obligations]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def summary_markdown(report: CheckReport) -> str:
    """The verdict of the whole check, with the estimated size and time when it passed, and the recipe's notes."""
    notes = "".join(f"\n- note: {n}" for n in report.notes)
    if report.ok:
        seconds = max(1, round(report.seconds_estimate))
        return (
            f"### ✓ Ready to merge into `{report.destination}`\n"
            f"Estimated output: **{_size(report.bytes_to_write)}**, about **{seconds} s** of merging. "
            f"Press **Submit** to queue it.{notes}"
        )
    problems = "\n".join(f"- {p}" for p in report.problems)
    return f"### ✗ This merge cannot be submitted\n{problems}{notes}"


def card_preview(card: str) -> str:
    """The card's markdown without its YAML front matter (shown as the Hub would render it)."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end != -1:
            return card[end + 4 :].lstrip("\n")
    return card


STATE_LABEL = {
    "queued": "waiting",
    "running": "merging…",
    "needs_sign_in": "⏸ sign in again to resume",
    "succeeded": "✓ done",
    "failed": "✗ failed",
    "cancelled": "cancelled",
}


@dataclass(frozen=True)
class QueueRow:
    job_id: str
    destination: str
    requester: str
    state: str
    place: str
    percent: int
    detail: str
    link: str | None
    kind: str = "merge"


def queue_rows(
    jobs: Sequence[tuple[Job, int | None]], hub_url: str, notes: Mapping[str, str] | None = None
) -> tuple[QueueRow, ...]:
    """One row per job: its place ("next", "3rd"...), progress, status and, when done, its repo.

    ``notes``: job id -> its latest progress line (an evolve job's "trial 3/5, best …").
    """
    notes = notes or {}
    rows = []
    for job, position in jobs:
        if job.state == "running":
            place = "searching now" if job.spec.kind == "evolve" else "merging now"
        elif job.state == "needs_sign_in":
            place = "paused"
        elif position is not None:
            place = "next" if position == 1 else f"#{position} in line"
        else:
            place = "–"
        detail = ""
        if job.state == "failed":
            detail = (job.reason or "").strip()
        elif job.state == "succeeded" and job.result_commit:
            detail = f"commit {job.result_commit[:12]}"
        elif job.state in ("cancelled", "needs_sign_in"):
            detail = job.reason or ""
        elif job.state == "running":
            detail = notes.get(job.id, "")
        shown = job.state == "succeeded" and "/" in job.spec.destination  # not a hidden private repo
        link = f"{hub_url.rstrip('/')}/{job.spec.destination}" if shown else None
        rows.append(
            QueueRow(
                job_id=job.id,
                destination=job.spec.destination,
                requester=job.spec.requester,
                state=job.state,
                place=place,
                percent=round(100 * (1.0 if job.state == "succeeded" else job.progress)),
                detail=detail,
                link=link,
                kind="evolve" if job.spec.kind == "evolve" else "merge",
            )
        )
    return tuple(rows)


def queue_html(rows: Sequence[QueueRow]) -> str:
    """The queue as a table with a progress bar per job."""
    if not rows:
        return "<p class='mb-muted'>No merges yet. Compose one in the first tab.</p>"
    out = [
        "<table class='mb-table' id='mb-queue'><thead><tr><th>job</th><th>kind</th><th>model</th><th>by</th>"
        "<th>status</th><th>place</th><th>progress</th><th>details</th></tr></thead><tbody>"
    ]
    for r in rows:
        repo = html.escape(r.destination)
        model = repo
        if r.link:
            card = f"{r.link}/resolve/main/README.md"
            model = (
                f"<a href='{html.escape(r.link)}' target='_blank' class='mb-repo-link'>{repo}</a>"
                f" · <a href='{html.escape(card)}' target='_blank' class='mb-card-link'>model card</a>"
            )
        bar = (
            f"<div class='mb-bar' role='progressbar' aria-valuenow='{r.percent}' aria-valuemin='0' "
            f"aria-valuemax='100' data-state='{r.state}'><div style='width:{r.percent}%'></div>"
            f"<span>{r.percent}%</span></div>"
        )
        out.append(
            f"<tr data-job='{html.escape(r.job_id)}' data-state='{r.state}'><td><code>{html.escape(r.job_id)}</code></td>"
            f"<td>{r.kind}</td><td>{model}</td><td>{html.escape(r.requester)}</td><td>{STATE_LABEL[r.state]}</td>"
            f"<td>{html.escape(r.place)}</td><td>{bar}</td><td>{html.escape(r.detail)}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def search_check_markdown(check: SearchCheck) -> str:
    """The Evolve tab's check: what is searched, on what, for how long, and any problem."""
    lines = []
    if check.ok:
        lines.append(f"### ✓ Ready to search, then publish the best merge to `{check.destination}`")
    else:
        lines.append("### ✗ This search cannot be submitted")
        lines += [f"- {p}" for p in check.problems]
    if check.dimensions:
        baselines = ", ".join(check.baselines) or "none"
        lines += [
            "",
            f"**{check.method}** merge, {check.trials} search trials after the baselines ({baselines}), "
            f"scored by {check.evaluation}.",
            "",
            f"Searched parameters ({len(check.dimensions)}):",
            "",
            "| # | parameter |",
            "|---|---|",
            *[f"| {i} | {d} |" for i, d in enumerate(check.dimensions, start=1)],
        ]
    return "\n".join(lines)
