"""The Space in headless Chromium: compose, check, submit, watch the queue, open the result.

The whole demo stack (localhub with the demo models, the bot, the Space) runs in this process
on 127.0.0.1 free ports; Playwright drives Debian's Chromium (never a downloaded browser).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mergebot.demo import DemoStack, demo_stack

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path("/tmp/mergebot-screenshots")
pytestmark = [
    # gradio 6.31 sets a pandas option that pandas 3 deprecates, from its queue thread (not our code)
    pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no Chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
]
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    with demo_stack(
        tmp_path_factory.mktemp("space-demo"), progress_interval_s=0.05, shard_bytes=100_000
    ) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, stack: DemoStack) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(stack.url)
    page.wait_for_selector("#mb-check")
    yield page
    context.close()


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / path.name)
    return path


def choose(page: Any, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_name(page: Any, name: str) -> None:
    page.locator("#mb-name textarea, #mb-name input").first.fill(name)


def yaml_text(page: Any) -> str:
    return str(page.locator("#mb-yaml .cm-content").inner_text())


def test_compose_check_submit_and_open_the_result(page: Any, stack: DemoStack, tmp_path: Path) -> None:
    choose(page, "mb-example", "ties")
    page.wait_for_function("document.querySelector('#mb-note').innerText.includes('Example for')")
    assert "merge_method: ties" in yaml_text(page)
    assert "demo-lab/tiny-base" in yaml_text(page)
    set_name(page, "tiny-ties")

    page.click("#mb-check")
    page.wait_for_selector("#mb-compat")
    assert page.locator("#mb-compat tbody tr").count() == 3
    assert page.locator("#mb-compat .mb-bad").count() == 0
    assert "compatible" in page.locator("#mb-compat-box").inner_text()
    licence = page.locator("#mb-license").inner_text()
    assert "Allowed" in licence and "apache-2.0" in licence
    assert "Ready to merge" in page.locator("#mb-summary").inner_text()
    assert "tiny-ties" in page.locator("#mb-card").inner_text()
    page.wait_for_selector("#mb-card .mermaid svg")  # the lineage graph, drawn in the page
    shot(page, tmp_path, "1-check-passed")

    page.click("#mb-submit")
    page.wait_for_selector("#mb-queue tr[data-state=succeeded]", timeout=90_000)
    bar = page.locator("#mb-queue tr[data-state=succeeded] [role=progressbar]").first
    assert bar.get_attribute("aria-valuenow") == "100"
    queue_shot = shot(page, tmp_path, "2-queue-done")

    link = page.locator("#mb-queue tr[data-state=succeeded] a.mb-card-link").first
    href = str(link.get_attribute("href"))
    assert href.startswith(stack.hub_url) and "mergebot/tiny-ties" in href
    # localhub serves files, not HTML repo pages: follow the link to the card the merge published
    response = page.request.get(href)
    assert response.ok
    card = response.text()
    assert "base_model:" in card and "demo-lab/tiny-math" in card and "license: apache-2.0" in card
    assert "```mermaid" in card
    info = page.request.get(f"{stack.hub_url}/api/models/mergebot/tiny-ties").json()
    assert any(s["rfilename"].endswith(".safetensors") for s in info["siblings"])
    assert queue_shot.exists()


def test_incompatible_merge_is_named_and_refused(page: Any, stack: DemoStack, tmp_path: Path) -> None:
    choose(page, "mb-example", "ties")
    page.wait_for_function("document.querySelector('#mb-note').innerText.includes('Example for')")
    text = yaml_text(page).replace("demo-lab/tiny-code", "demo-lab/wide-base")
    editor = page.locator("#mb-yaml .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.insert_text(text)
    set_name(page, "tiny-broken")  # leaving the editor brings the YAML into the form
    page.wait_for_function("document.querySelector('#mb-models').innerHTML.includes('demo-lab/wide-base')")

    page.click("#mb-check")
    page.wait_for_selector("#mb-compat .mb-bad")
    summary = page.locator("#mb-summary").inner_text()
    assert "cannot be submitted" in summary and "hidden_size" in summary
    assert re.search(r"96", page.locator("#mb-compat").inner_text())

    page.click("#mb-submit")
    page.wait_for_function("document.querySelector('#mb-outcome').innerText.includes('Submit refused')")
    shot(page, tmp_path, "4-incompatible-refused")
    jobs = httpx.get(f"{stack.url}jobs").json()
    assert all(j["destination"] != "mergebot/tiny-broken" for j in jobs)


def test_cancel_a_waiting_job_and_check_a_search(page: Any, stack: DemoStack, tmp_path: Path) -> None:
    stack.bot.queue.hold()  # the job must still be waiting when Cancel is pressed
    try:
        choose(page, "mb-example", "ties")
        page.wait_for_function("document.querySelector('#mb-note').innerText.includes('Example for')")
        set_name(page, "tiny-cancelled")
        page.click("#mb-submit")
        page.wait_for_selector("#mb-queue tr[data-state=queued]")
        job_id = page.locator("#mb-job-id textarea, #mb-job-id input").first.input_value()
        assert job_id and page.locator(f"#mb-queue tr[data-job='{job_id}']").count() == 1
        page.click("#mb-cancel")
        page.wait_for_selector(f"#mb-queue tr[data-job='{job_id}'][data-state=cancelled]")
        assert "Cancelled" in page.locator("#mb-job-note").inner_text()
        shot(page, tmp_path, "5-cancelled")
    finally:
        stack.bot.queue.resume()
    assert stack.bot.store.get(job_id).state == "cancelled"  # type: ignore[union-attr]

    page.get_by_role("tab", name="Evolve").click()
    page.click("#mb-evolve-check")
    page.wait_for_function(
        "document.querySelector('#mb-evolve-report').innerText.includes('Searched parameters')"
    )
    report = page.locator("#mb-evolve-report").inner_text()
    assert "weight tiny-math" in report and "cannot be submitted" in report
    assert "Give the merged model a name" in report  # the example's only gap in the demo
    assert "tokenizer" not in report and "evaluation data" not in report
    shot(page, tmp_path, "6-evolve-check")


def test_the_evolve_example_runs_to_a_published_search(page: Any, stack: DemoStack, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Evolve").click()
    page.locator("#mb-evolve-name textarea, #mb-evolve-name input").first.fill("tiny-evolved")
    page.click("#mb-evolve-check")
    page.wait_for_function(
        "document.querySelector('#mb-evolve-report').innerText.includes('Ready to search')"
    )
    report = page.locator("#mb-evolve-report").inner_text()
    assert (
        "mergebot/tiny-evolved" in report and "3 search trials" in report and "demo-lab/eval-text" in report
    )
    shot(page, tmp_path, "7-evolve-ready")

    page.click("#mb-evolve-submit")  # the queue tab opens on the job
    page.wait_for_selector(
        "#mb-queue tr[data-state=succeeded] a.mb-card-link[href*='tiny-evolved']", timeout=90_000
    )
    row = page.locator("#mb-queue tr[data-state=succeeded]", has=page.locator("a[href*='tiny-evolved']"))
    assert "evolve" in row.inner_text()
    shot(page, tmp_path, "8-evolve-done")
    href = str(row.locator("a.mb-card-link").first.get_attribute("href"))
    card = page.request.get(href).text()
    assert "## Search history" in card and "3 search trials and 1 baseline" in card
