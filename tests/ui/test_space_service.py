"""The Space's adapter over the bot, against the demo stack (localhub + bot + Space, in-process).

Check reports every problem at once; Submit enters the bot's own queue and refuses what the
check refuses; one process serves the page, the webhook and /health; jobs survive a restart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.errors import BotError
from bot.jobs import new_guest
from engine import MergeError
from mergebot.demo import DemoStack, demo_stack
from mergebot.demo_models import DEMO_FAMILY
from space.compose import form_to_yaml
from space.service import SpaceService

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]


def recipe(*others: str, base: str = "demo-lab/tiny-base") -> str:
    models = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for m in others)
    return f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("space-service")


@pytest.fixture(scope="module")
def stack(data: Path) -> Iterator[DemoStack]:
    with demo_stack(data, progress_interval_s=0.05) as s:
        yield s


@pytest.fixture
def service(stack: DemoStack) -> SpaceService:
    return SpaceService(stack.bot)


def test_the_demo_hub_has_two_generations_and_several_licences(stack: DemoStack) -> None:
    assert stack.models[0] == "demo-lab/tiny-base"
    card = httpx.get(f"{stack.hub_url}/demo-lab/tiny-math-pro/resolve/main/README.md").text
    assert "base_model: demo-lab/tiny-math" in card and "license: mit" in card
    assert {m.license for m in DEMO_FAMILY} >= {"apache-2.0", "mit", "cc-by-nc-4.0", "llama3"}


def test_one_process_serves_page_webhook_and_health(stack: DemoStack) -> None:
    assert httpx.get(stack.url).status_code == 200
    assert httpx.get(f"{stack.url}health").json() == {"status": "ok", "bot": "mergebot"}
    refused = httpx.post(f"{stack.url}webhooks/mergebot", json={}, headers={"X-Webhook-Secret": "wrong"})
    assert refused.status_code in (401, 403)


def test_check_passes_with_facts_size_and_card(service: SpaceService) -> None:
    report = service.check(recipe("demo-lab/tiny-math", "demo-lab/tiny-code"), name="checked")
    assert report.ok, report.problems
    assert report.destination == "mergebot/checked"
    assert report.audit is not None and report.audit.ok and len(report.audit.reports) == 3
    assert report.verdict is not None and report.verdict.license == "apache-2.0"
    assert report.bytes_to_write > 0 and report.seconds_estimate > 0
    assert "```mermaid" in report.card_markdown and "demo-lab/tiny-math" in report.card_markdown


def test_check_gives_the_recipes_notes(service: SpaceService) -> None:
    text = recipe("demo-lab/tiny-math") + "parameters: {nomalize: true}\n"
    report = service.check(text, name="noted")
    assert report.ok, report.problems
    assert (
        len(report.notes) == 1
        and "parameter 'nomalize' has no effect (did you mean 'normalize'?)" in report.notes[0]
    )
    assert service.check(recipe("demo-lab/tiny-math"), name="plain").notes == ()


def test_check_names_every_problem_at_once(service: SpaceService) -> None:
    report = service.check(recipe("demo-lab/tiny-llama-style", "demo-lab/nope"), name="bad name!")
    assert not report.ok
    text = "\n".join(report.problems)
    assert "not a valid repo name" in text and "`demo-lab/nope` does not exist" in text
    llama = service.check(recipe("demo-lab/tiny-llama-style"), name="my-merge")
    assert not llama.ok and llama.verdict is not None and not llama.verdict.allowed
    assert any('"Llama"' in r for r in llama.verdict.reasons)
    assert service.check(recipe("demo-lab/tiny-llama-style"), name="Llama-merge").ok
    broken = service.check("merge_method: ties\nmodels: 3\n", name="x")
    assert not broken.ok and "not valid" in broken.problems[0]


def test_check_shows_the_mismatch(service: SpaceService) -> None:
    report = service.check(recipe("demo-lab/tiny-math", "demo-lab/wide-base"), name="wide")
    assert not report.ok and report.audit is not None
    assert [m.field for m in report.audit.mismatches] == ["hidden_size"]
    assert any("hidden_size differs" in p for p in report.problems)


def test_submit_refuses_what_the_check_refuses(service: SpaceService) -> None:
    with pytest.raises((BotError, MergeError), match=r"hidden_size|not compatible"):
        service.submit(recipe("demo-lab/tiny-math", "demo-lab/wide-base"), name="wide")
    with pytest.raises(BotError, match="Llama"):
        service.submit(recipe("demo-lab/tiny-llama-style"), name="my-merge")
    assert not [
        j for j in service.bot.store.all() if j.spec.destination in ("mergebot/wide", "mergebot/my-merge")
    ]


def test_a_merge_above_the_bots_size_limit_is_refused_by_check_and_submit(
    service: SpaceService, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited = service.bot.settings.model_copy(update={"max_merge_bytes": 1000})  # the demo models: ~90 kB
    monkeypatch.setattr(service.bot, "settings", limited)
    report = service.check(recipe("demo-lab/tiny-math", "demo-lab/tiny-code"), name="too-big")
    assert not report.ok and report.bytes_to_write > 1000
    assert any("above this bot's limit" in p and "mergebot merge" in p for p in report.problems)
    with pytest.raises(BotError, match="above this bot's limit"):
        service.submit(recipe("demo-lab/tiny-math", "demo-lab/tiny-code"), name="too-big")
    assert not [j for j in service.bot.store.all() if j.spec.destination == "mergebot/too-big"]


def test_submit_enters_the_bots_queue_and_publishes(service: SpaceService, stack: DemoStack) -> None:
    guest = new_guest()
    job = service.submit(recipe("demo-lab/tiny-math", "demo-lab/tiny-chat"), name="nc-merge", requester=guest)
    assert job.spec.requester == guest and job.spec.report is None
    assert set(job.spec.parents) == {"demo-lab/tiny-base", "demo-lab/tiny-math", "demo-lab/tiny-chat"}
    assert all(re.fullmatch(r"[0-9a-f]{40}", sha) for sha in job.spec.parents.values())  # each pinned
    deadline = time.monotonic() + 60
    while (current := service.bot.store.get(job.id)) is not None and current.state in ("queued", "running"):
        assert time.monotonic() < deadline, "the merge did not finish"
        time.sleep(0.1)
    assert current is not None and current.state == "succeeded", current.reason
    card = httpx.get(f"{stack.hub_url}/mergebot/nc-merge/resolve/main/README.md").text
    assert "license: cc-by-nc-4.0" in card
    assert any(j.id == job.id for j, _ in service.jobs())
    with pytest.raises(BotError, match="already exists"):
        service.submit(recipe("demo-lab/tiny-math"), name="nc-merge", requester=new_guest())


def test_read_form_turns_the_widgets_into_yaml() -> None:
    from space.app import read_form

    form = read_form(
        "ties",
        "org/base",
        [["org/a", "0.7", "0.5"], ["", "", ""], ["org/b", 0.3, ""]],
        [["normalize", "false", "..."], ["lambda", "1", "..."]],
        "float16",
    )
    text = form_to_yaml(form)
    assert "org/a" in text and "weight: 0.7" in text and "normalize: false" in text and "float16" in text
    assert [r.model for r in form.models] == ["org/a", "org/b"] and "density" not in form.models[1].params


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    with demo_stack(tmp_path, progress_interval_s=0.05) as first:
        service = SpaceService(first.bot)
        first.bot.queue.stop(wait=True)  # nothing runs: the job must wait across the restart
        job = service.submit(recipe("demo-lab/tiny-math"), name="survivor")
    with demo_stack(tmp_path, progress_interval_s=0.05) as second:
        again = SpaceService(second.bot)
        assert any(j.id == job.id for j, _ in again.jobs())
        deadline = time.monotonic() + 60
        while (current := second.bot.store.get(job.id)) is not None and current.state != "succeeded":
            assert current.state in ("queued", "running"), current.reason
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_the_app_is_built_by_a_function_never_at_import() -> None:
    import gradio as gr

    import space.app

    assert not any(isinstance(v, gr.Blocks) for v in vars(space.app).values())
