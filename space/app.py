"""The Gradio app: compose a merge, check it, submit it to the bot's queue, and follow the queue.

Built by :func:`build_ui` (never launched at import) over a :class:`~space.service.SpaceService`;
:func:`create_app` mounts it on the bot's FastAPI app, so one process serves the page, the
webhook (``/webhooks/mergebot``) and the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import gradio as gr
from fastapi import FastAPI

from bot.app import create_app as create_bot_app
from bot.jobs import new_guest
from bot.service import Bot
from engine import METHODS, RecipeError
from space.compose import (
    DTYPES,
    MergeForm,
    ModelRow,
    example_form,
    form_to_yaml,
    per_model_params,
    shared_params,
    yaml_to_form,
)
from space.evolve_tab import evolve_tab
from space.service import SpaceService
from space.session import error_message, signed_in, user_name
from space.views import (
    card_preview,
    compat_html,
    license_markdown,
    queue_html,
    queue_rows,
    summary_markdown,
)

UI_PATH = "/"
CSS = """
.mb-table {border-collapse: collapse; width: 100%; font-size: 0.92em}
.mb-table th, .mb-table td {border: 1px solid #d0d7de; padding: 4px 8px; text-align: left}
.mb-table th {background: #f3f4f6}
.mb-bad {background: #fde2e1; color: #a40e26; font-weight: 600}
.mb-bad-text {color: #a40e26; font-weight: 600}
.mb-good {color: #116329; font-weight: 600}
.mb-muted {color: #6b7280}
.mb-bar {position: relative; width: 160px; height: 18px; background: #e5e7eb; border-radius: 9px; overflow: hidden}
.mb-bar > div {height: 100%; background: #3b82f6}
.mb-bar[data-state=succeeded] > div {background: #16a34a}
.mb-bar[data-state=failed] > div {background: #dc2626}
.mb-bar > span {position: absolute; inset: 0; text-align: center; font-size: 12px; line-height: 18px}
"""

INTRO = """# mergebot: merge models without writing code
A **merge** combines several fine-tuned models of the *same* base model into one new model, without any training.
1. **Compose**: pick a method (or an example), the base model and the models to combine with their weights.
2. **Check**: see whether the models fit together, what licence the result gets, its size, and its model card.
3. **Submit**: the merge joins the queue; the **Queue** tab shows its progress and links to the new model.

Or let **Evolve** search the best weights for you.
"""

METHOD_HELP = {
    "linear": "weighted average of the models",
    "slerp": "smooth blend of two models (t from 0 to 1)",
    "task_arithmetic": "adds each fine-tune's changes to the base",
    "ties": "adds the fine-tunes' strongest changes, resolving sign conflicts",
    "dare_ties": "like TIES, with random dropping of small changes",
    "dare_linear": "task arithmetic with random dropping",
}


def _table(form: MergeForm) -> dict[str, Any]:
    names = [p.name for p in per_model_params(form.method)]
    data = [[row.model, *[row.params.get(n, "") for n in names]] for row in form.models]
    return {"headers": ["model", *names], "data": data or [["", *["" for _ in names]]]}


def _settings_table(form: MergeForm) -> dict[str, Any]:
    data = [[p.name, form.shared.get(p.name, p.default), p.doc] for p in shared_params(form.method)]
    return {"headers": ["setting", "value", "what it does"], "data": data or [["", "", ""]]}


def _number(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    text = str(value).strip()
    if text.lower() in {"true", "false"}:
        return text.lower() == "true"
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text else number


def _rows(table: Any) -> list[list[Any]]:
    if table is None:
        return []
    if hasattr(table, "values"):  # pandas
        return [list(r) for r in table.values.tolist()]
    if isinstance(table, dict):
        return [list(r) for r in table.get("data", [])]
    return [list(r) for r in table]


def read_form(method: str, base: str, table: Any, settings: Any, dtype: str) -> MergeForm:
    """The form's widgets -> a MergeForm (blank rows are skipped)."""
    names = [p.name for p in per_model_params(method)]
    rows = []
    for raw in _rows(table):
        model = str(raw[0] or "").strip() if raw else ""
        if not model:
            continue
        params = {n: _number(v) for n, v in zip(names, raw[1:], strict=False)}
        rows.append(ModelRow(model, {k: v for k, v in params.items() if v is not None}))
    known = {p.name for p in shared_params(method)}
    shared = {}
    for raw in _rows(settings):
        if raw and str(raw[0]) in known and len(raw) > 1:
            value = _number(raw[1])
            if value is not None:
                shared[str(raw[0])] = value
    base = (base or "").strip()
    if (
        base
        and base not in [r.model for r in rows]
        and METHODS[method].needs_base is False
        and method != "slerp"
    ):
        base = ""
    return MergeForm(method, base or None, tuple(rows), shared, dtype or "bfloat16")


def build_ui(service: SpaceService, *, models: Sequence[str] = (), oauth: bool = False) -> gr.Blocks:
    """The Blocks of the Space.

    Args:
        service: the bot's services.
        models: model repos offered by the examples (base first), e.g. the demo's models.
        oauth: show "Sign in with Hugging Face" (only where the Space has OAuth set up).
    """
    base_example = models[0] if models else "org/base-model"
    others = list(models[1:3]) if len(models) > 2 else ["org/fine-tune-a", "org/fine-tune-b"]
    start = example_form("ties", base_example, others)
    methods = sorted(METHODS)
    method_choices = [(f"{m}: {METHOD_HELP[m]}" if m in METHOD_HELP else m, m) for m in methods]

    with gr.Blocks(title="mergebot") as ui:
        with gr.Row():
            gr.Markdown(INTRO)
            if oauth:
                gr.LoginButton()
        where = (
            f"Merges are published to **{service.namespace()}/…** on [{service.hub_url}]({service.hub_url})"
        )
        gr.Markdown(
            where + (", or to **your own namespace** with your own token when you sign in." if oauth else ".")
        )
        mine = gr.State([])  # ids of the jobs submitted from this page session (it may cancel them)
        guest = gr.State(new_guest)  # this page session's identity when nobody signed in: one per load
        with gr.Tabs(selected="compose") as tabs:
            with gr.Tab("Compose", id="compose"):
                with gr.Row():
                    with gr.Column(scale=3):
                        example = gr.Dropdown(
                            [("choose an example…", "")] + [(m, m) for m in methods],
                            value="",
                            label="Start from an example (one per method)",
                            elem_id="mb-example",
                        )
                        method = gr.Dropdown(
                            method_choices, value="ties", label="Merge method", elem_id="mb-method"
                        )
                        base = gr.Textbox(
                            value=start.base_model or "",
                            label="Base model (the model the others were fine-tuned from)",
                            elem_id="mb-base",
                        )
                        table = gr.Dataframe(
                            value=_table(start),
                            label="Models to merge (edit cells; weight = how much of each, density = share of its changes kept)",
                            type="array",
                            interactive=True,
                            elem_id="mb-models",
                        )
                        settings = gr.Dataframe(
                            value=_settings_table(start),
                            label="Method settings",
                            type="array",
                            interactive=True,
                            elem_id="mb-settings",
                        )
                        with gr.Row():
                            dtype = gr.Dropdown(list(DTYPES), value="bfloat16", label="Number format (dtype)")
                            name = gr.Textbox(
                                label="Name of the merged model", placeholder="my-merge", elem_id="mb-name"
                            )
                        with gr.Row():
                            private = gr.Checkbox(label="Private repo", value=False)
                            accept = gr.Checkbox(
                                label="I have read the parents' licences and accept unrecognised terms",
                                value=False,
                            )
                    with gr.Column(scale=2):
                        recipe = gr.Code(
                            value=form_to_yaml(start),
                            language="yaml",
                            label="Recipe (mergekit YAML, kept in step with the form; edit either)",
                            elem_id="mb-yaml",
                        )
                        note = gr.Markdown("", elem_id="mb-note")
                with gr.Row():
                    check_btn = gr.Button("Check", variant="secondary", elem_id="mb-check")
                    submit_btn = gr.Button("Submit", variant="primary", elem_id="mb-submit")
                outcome = gr.Markdown("", elem_id="mb-outcome")
                with gr.Column(visible=False) as report_box:
                    summary = gr.Markdown(elem_id="mb-summary")
                    gr.Markdown("#### Compatibility of the models")
                    compat = gr.HTML(elem_id="mb-compat-box")
                    gr.Markdown("#### Licence of the merge")
                    licence = gr.Markdown(elem_id="mb-license")
                    with gr.Accordion("Preview of the model card", open=True):
                        card = gr.Markdown(elem_id="mb-card")
            with gr.Tab("Evolve", id="evolve"):
                wire_evolve = evolve_tab(service, base_example, others)
            with gr.Tab("Queue", id="queue"):
                gr.Markdown("Every job (merges and searches), newest first. The page refreshes by itself.")
                queue = gr.HTML(elem_id="mb-queue-box")
                timer = gr.Timer(1.0)
                with gr.Row():
                    job_box = gr.Textbox(
                        label="Job id (yours: submitted from this page"
                        + (", or while signed in)" if oauth else ")"),
                        elem_id="mb-job-id",
                        scale=3,
                    )
                    cancel_btn = gr.Button("Cancel job", variant="stop", elem_id="mb-cancel", scale=1)
                    resume_btn = gr.Button(
                        "Resume (signed in again)", elem_id="mb-resume", visible=oauth, scale=1
                    )
                job_note = gr.Markdown("", elem_id="mb-job-note")

        form_inputs = [method, base, table, settings, dtype]

        def form_changed(m: str, b: str, t: Any, s: Any, d: str) -> tuple[str, str]:
            try:
                return form_to_yaml(read_form(m, b, t, s, d)), ""
            except Exception as exc:  # a half-typed form: keep the YAML, say why
                return gr.skip(), f"⚠️ {exc}"

        for component in (base, table, settings, dtype):
            component.input(form_changed, form_inputs, [recipe, note])

        def show_form(form: MergeForm) -> list[Any]:
            return [
                gr.update(value=form.method),
                form.base_model or "",
                _table(form),
                _settings_table(form),
                form.dtype,
            ]

        def method_changed(m: str, b: str, t: Any, d: str) -> list[Any]:
            old = read_form(m, b, t, None, d)
            spec = METHODS[m]
            keep = {p.name for p in per_model_params(m)}
            rows = tuple(
                ModelRow(r.model, {k: v for k, v in r.params.items() if k in keep}) for r in old.models
            )
            defaults = {p.name: p.default for p in shared_params(m) if p.default is not None}
            form = MergeForm(m, b or None, rows, defaults, d)
            if spec.needs_base and not b:
                form = MergeForm(m, base_example, rows, form.shared, d)
            return [*show_form(form)[1:], form_to_yaml(form) if rows else gr.skip(), ""]

        method.input(
            method_changed, [method, base, table, dtype], [base, table, settings, dtype, recipe, note]
        )

        def example_chosen(m: str) -> list[Any]:
            if not m:
                return [gr.skip()] * 7
            form = example_form(m, base_example, others)
            return [*show_form(form), form_to_yaml(form), f"Example for **{m}** loaded."]

        example.input(example_chosen, [example], [method, base, table, settings, dtype, recipe, note])

        def yaml_changed(text: str) -> list[Any]:
            try:
                reading = yaml_to_form(text)
            except RecipeError as exc:
                return [gr.skip()] * 5 + [f"⚠️ The YAML is not a valid recipe yet:\n```\n{exc}\n```"]
            if reading.form is None:
                return [gr.skip()] * 5 + [f"ℹ️ The form cannot show this recipe: {reading.advanced}."]
            return [*show_form(reading.form), ""]

        recipe.blur(yaml_changed, [recipe], [method, base, table, settings, dtype, note])

        def check(
            text: str,
            n: str,
            priv: bool,
            acc: bool,
            profile: gr.OAuthProfile | None,
            oauth_token: gr.OAuthToken | None,
        ) -> list[Any]:
            report = service.check(
                text,
                name=(n or "").strip(),
                accept_license=acc,
                user=user_name(profile),
                signed_in=signed_in(profile, oauth_token),
                private=priv,
            )
            return [
                gr.update(visible=True),
                summary_markdown(report),
                compat_html(report.audit) if report.config is not None else "",
                license_markdown(report.verdict),
                card_preview(report.card_markdown),
                "",
            ]

        check_outputs = [report_box, summary, compat, licence, card, outcome]
        check_btn.click(check, [recipe, name, private, accept], check_outputs)

        def submit(
            text: str,
            n: str,
            priv: bool,
            acc: bool,
            session_jobs: list[str],
            session_guest: str,
            profile: gr.OAuthProfile | None,
            oauth_token: gr.OAuthToken | None,
        ) -> list[Any]:
            n = (n or "").strip()
            user = signed_in(profile, oauth_token)
            report = service.check(text, name=n, accept_license=acc, signed_in=user, private=priv)
            shown = [
                gr.update(visible=True),
                summary_markdown(report),
                compat_html(report.audit) if report.config is not None else "",
                license_markdown(report.verdict),
                card_preview(report.card_markdown),
            ]
            refused = [gr.skip()] * 3
            if not report.ok:
                return [*shown, "**Submit refused:** the check failed; fix what it lists above.", *refused]
            try:
                job = service.submit(
                    text,
                    name=n,
                    private=priv,
                    accept_license=acc,
                    requester=session_guest,
                    signed_in=user,
                )
            except Exception as exc:
                return [*shown, f"**Submit refused:** {error_message(exc)}", *refused]
            return [
                *shown,
                f"✅ Queued as job `{job.id}` → `{job.spec.destination}`. Follow it in the **Queue** tab.",
                gr.Tabs(selected="queue"),
                [*(session_jobs or []), job.id],
                job.id,
            ]

        submit_btn.click(
            submit, [recipe, name, private, accept, mine, guest], [*check_outputs, tabs, mine, job_box]
        )

        def refresh(session_jobs: list[str], profile: gr.OAuthProfile | None) -> str:
            listed = service.jobs(viewer=user_name(profile), session_jobs=session_jobs or [])
            return queue_html(queue_rows(listed, service.hub_url, service.notes()))

        wire_evolve(tabs, mine, job_box, guest)

        def cancel(job_id: str, session_jobs: list[str], profile: gr.OAuthProfile | None) -> str:
            user = user_name(profile)
            try:
                return service.cancel(job_id or "", user=user, session_jobs=session_jobs or [])
            except Exception as exc:
                return f"**Not cancelled:** {error_message(exc)}"

        def resume(job_id: str, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None) -> str:
            user = signed_in(profile, oauth_token)
            if user is None:
                return "**Not resumed:** sign in with Hugging Face first (the button at the top)."
            try:
                job = service.resume(job_id or "", user)
            except Exception as exc:
                return f"**Not resumed:** {error_message(exc)}"
            return f"▶️ Job `{job.id}` is back in the queue."

        cancel_btn.click(cancel, [job_box, mine], job_note).then(refresh, [mine], queue)
        resume_btn.click(resume, [job_box], job_note).then(refresh, [mine], queue)

        timer.tick(refresh, [mine], queue, show_progress="hidden")
        ui.load(refresh, [mine], queue)
    return ui


def create_app(bot: Bot, *, models: Sequence[str] = (), oauth: bool = False, manage: bool = True) -> FastAPI:
    """One FastAPI app: the bot's webhook, /health and /jobs, and the Space's page at ``/``."""
    app = create_bot_app(bot, manage=manage)

    def mount() -> FastAPI:
        ui = build_ui(SpaceService(bot), models=models, oauth=oauth)
        return gr.mount_gradio_app(app, ui, path=UI_PATH, css=CSS, ssr_mode=False)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        # Outside a loop, Gradio makes a new event loop for each lock it creates and never
        # closes them; inside a short-lived loop it makes none.
        async def in_loop() -> FastAPI:
            return mount()

        return asyncio.run(in_loop())
    return mount()
