"""The Evolve tab: a search file editor with an example, Check (what is searched, what is wrong) and
Submit into the bot's queue, the same as ``@mergebot evolve`` in a discussion."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from space.compose import example_search
from space.service import SpaceService
from space.session import error_message, signed_in, user_name
from space.views import search_check_markdown

EVOLVE_HELP = """**Evolve** searches the coefficients of a merge for you: each trial merges the models in memory
with new weights and densities (CMA-ES picks them), scores the result on your evaluation data, and the
best merge is published with a card that shows the search history. Models are Hub repos; the evaluation
data is a file in a Hub repo, written `hf://datasets/org/name/path.jsonl` (a dataset) or
`hf://org/name/path.txt` (a model repo). **Check** shows what is searched; **Submit** queues the search."""

Wire = Callable[[gr.Tabs, gr.State, gr.Textbox, gr.State], None]

# The tab's example is a quick try: a few trials (seconds on the demo's models) and one baseline.
QUICK_TRY = {
    "budget": "budget: {trials: 3}       # a quick try; a real search wants dozens of trials",
    "baselines": "baselines: [linear]       # scored too, to compare the search with",
}


def tab_example(base: str, others: Sequence[str]) -> str:
    """The Evolve tab's example: TIES over ``others`` and ``base``, scored on ``org/eval-text``'s
    eval.txt in ``base``'s namespace (the demo hub's evaluation dataset), with a tiny budget."""
    data = f"hf://datasets/{base.split('/')[0]}/eval-text/eval.txt"
    lines = example_search(base, others, data).splitlines()
    return "\n".join(QUICK_TRY.get(line.split(":", 1)[0], line) for line in lines) + "\n"


def evolve_tab(service: SpaceService, base: str, others: Sequence[str]) -> Wire:
    """Lay the tab out inside the caller's ``gr.Tab``.

    Returns:
        ``wire(tabs, mine, job_box, guest)``, to call once the queue's widgets exist: a submitted
        search switches to the queue tab, joins this page session's jobs and fills the job id box;
        ``guest`` holds the page session's guest identity (used when nobody signed in).
    """
    gr.Markdown(EVOLVE_HELP)
    with gr.Row():
        with gr.Column(scale=3):
            search = gr.Code(
                value=tab_example(base, others),
                language="yaml",
                label="Search file (the format of `mergebot evolve`)",
                elem_id="mb-evolve-yaml",
            )
        with gr.Column(scale=2):
            name = gr.Textbox(
                label="Name of the evolved model", placeholder="my-evolved-merge", elem_id="mb-evolve-name"
            )
            private = gr.Checkbox(label="Private repo", value=False)
            accept = gr.Checkbox(
                label="I have read the parents' licences and accept unrecognised terms", value=False
            )
            with gr.Row():
                check_btn = gr.Button("Check", variant="secondary", elem_id="mb-evolve-check")
                submit_btn = gr.Button("Submit", variant="primary", elem_id="mb-evolve-submit")
    outcome = gr.Markdown("", elem_id="mb-evolve-outcome")
    report = gr.Markdown("", elem_id="mb-evolve-report")

    def check(
        text: str,
        n: str,
        priv: bool,
        acc: bool,
        profile: gr.OAuthProfile | None,
        oauth_token: gr.OAuthToken | None,
    ) -> list[str]:
        checked = service.check_search(
            text,
            name=(n or "").strip(),
            accept_license=acc,
            user=user_name(profile),
            signed_in=signed_in(profile, oauth_token),
            private=priv,
        )
        return [search_check_markdown(checked), ""]

    def submit(
        text: str,
        n: str,
        priv: bool,
        acc: bool,
        session_jobs: list[str],
        guest: str,
        profile: gr.OAuthProfile | None,
        oauth_token: gr.OAuthToken | None,
    ) -> list[Any]:
        n = (n or "").strip()
        user = signed_in(profile, oauth_token)
        checked = service.check_search(text, name=n, accept_license=acc, signed_in=user, private=priv)
        shown = search_check_markdown(checked)
        if not checked.ok:
            return [shown, "**Submit refused:** the check failed; fix what it lists below.", *[gr.skip()] * 3]
        try:
            job = service.submit_search(
                text, name=n, private=priv, accept_license=acc, requester=guest, signed_in=user
            )
        except Exception as exc:
            return [shown, f"**Submit refused:** {error_message(exc)}", *[gr.skip()] * 3]
        return [
            shown,
            f"✅ Queued as job `{job.id}` → `{job.spec.destination}`. Follow its trials in the **Queue** tab.",
            gr.Tabs(selected="queue"),
            [*(session_jobs or []), job.id],
            job.id,
        ]

    check_btn.click(check, [search, name, private, accept], [report, outcome])

    def wire(tabs: gr.Tabs, mine: gr.State, job_box: gr.Textbox, guest: gr.State) -> None:
        submit_btn.click(
            submit, [search, name, private, accept, mine, guest], [report, outcome, tabs, mine, job_box]
        )

    return wire
