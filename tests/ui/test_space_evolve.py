"""The Space's Evolve tab at the service and view level: check a search file (what is searched, what is
wrong), submit it to the bot's queue, and watch its trials in the queue view.

The demo's models carry a tokenizer and the demo hub has an evaluation dataset, so the tab's example
(read from the page's own config) passes Check as it is and runs to a published model. The test adds
one copy of the base without its tokenizer, to see the problems Check names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi
from pydantic import SecretStr

from bot.credentials import UserCredential
from mergebot.demo import DEMO_USER, DemoStack, demo_stack
from space.evolve_tab import tab_example
from space.service import SearchCheck, SpaceService
from space.views import queue_html, queue_rows, search_check_markdown

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
UNTOKENIZED = f"{DEMO_USER}/untokenized-base"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    data = tmp_path_factory.mktemp("space-evolve")
    with demo_stack(data, progress_interval_s=0.05) as s:
        api = HfApi(endpoint=s.hub_url, token=(data / "secrets" / "user-token").read_text().strip())
        api.create_repo(UNTOKENIZED)
        api.upload_folder(
            repo_id=UNTOKENIZED,
            folder_path=str(data / "models" / "tiny-base"),
            ignore_patterns=["tokenizer*"],
        )
        yield s


@pytest.fixture(scope="module")
def example(stack: DemoStack) -> str:
    """The search file the Evolve tab shows, as the page serves it."""
    config = httpx.get(f"{stack.url}config", timeout=30).json()
    (text,) = [
        c["props"]["value"]
        for c in config["components"]
        if c.get("props", {}).get("elem_id") == "mb-evolve-yaml"
    ]
    assert text.strip() == tab_example(stack.models[0], stack.models[1:3]).strip()  # Code drops the last \n
    return str(text)


def test_the_demo_hub_has_tokenized_models_and_evaluation_data(stack: DemoStack, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    api = HfApi(endpoint=stack.hub_url)
    assert stack.dataset == "demo-lab/eval-text"
    files = set(api.list_repo_files(stack.dataset, repo_type="dataset"))
    assert {"README.md", "eval.txt", "qa.jsonl"} <= files
    for repo in stack.models:
        assert api.file_exists(repo, "tokenizer.json") and api.file_exists(repo, "tokenizer_config.json")
    folder = api.snapshot_download(stack.models[0], allow_patterns=["*.json"], local_dir=tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = api.hf_hub_download(stack.models[0], "config.json", local_dir=tmp_path)
    assert len(tokenizer) <= json.loads(Path(config).read_text())["vocab_size"]
    ids = tokenizer("A merge of fine-tunes.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A merge of fine-tunes."


def test_check_lists_the_searched_parameters_or_every_problem(stack: DemoStack, example: str) -> None:
    service = SpaceService(stack.bot)
    ok = service.check_search(example, name="evolved-check")
    assert ok.ok, ok.problems
    assert ok.destination == "mergebot/evolved-check" and ok.trials == 3 and ok.baselines == ("linear",)
    assert ok.dimensions == (
        "weight tiny-math",
        "weight tiny-code",
        "density tiny-math",
        "density tiny-code",
    )
    shown = search_check_markdown(ok)
    assert "Ready to search" in shown and "| 3 | density tiny-math |" in shown and "perplexity on" in shown
    assert "the best of the 3 best search trials and the baselines on 8 validation items" in shown

    broken = example.replace(f"base_model: {stack.models[0]}", f"base_model: {UNTOKENIZED}")
    broken = broken.replace("eval-text/eval.txt", "eval-text/missing.txt")
    refused = service.check_search(broken, name="demo-evolve")
    assert not refused.ok and refused.dimensions  # still shows what would be searched
    assert any("has no tokenizer" in p and "evaluation data cannot be read" in p for p in refused.problems)
    bad = service.check_search(example.replace("min: 0.2", "min: 2"), name="bad name!")
    assert not bad.ok and "not a valid repo name" in bad.problems[0] and "density" in bad.problems[1]
    assert "cannot be submitted" in search_check_markdown(bad)
    assert "cannot be submitted" in search_check_markdown(SearchCheck(problems=("x",)))


def test_the_example_runs_in_the_queue_with_trial_progress_and_lands_in_the_users_namespace(
    stack: DemoStack, example: str, tmp_path: Path
) -> None:
    service = SpaceService(stack.bot)
    token = (Path(stack.bot.settings.data_dir).parent / "secrets" / "user-token").read_text().strip()
    job = service.submit_search(
        example, name="evolved", signed_in=UserCredential(DEMO_USER, SecretStr(token))
    )
    assert job.spec.kind == "evolve" and job.spec.destination == f"{DEMO_USER}/evolved"
    notes: set[str] = set()
    deadline = time.monotonic() + 120
    while (current := stack.bot.store.get(job.id)) is not None and current.state in ("queued", "running"):
        assert time.monotonic() < deadline, "the search did not finish"
        rows = queue_rows(service.jobs(), service.hub_url, service.notes())
        notes.update(r.detail for r in rows if r.job_id == job.id and r.state == "running")
        time.sleep(0.05)
    assert current is not None and current.state == "succeeded", current.reason
    assert any(n.startswith("trial ") and "best" in n for n in notes), notes
    shown = queue_html(queue_rows(service.jobs(), service.hub_url, service.notes()))
    assert "<td>evolve</td>" in shown
    api = HfApi(endpoint=stack.hub_url, token=token)
    assert api.model_info(f"{DEMO_USER}/evolved").author == DEMO_USER
    readme = Path(api.hf_hub_download(f"{DEMO_USER}/evolved", "README.md", local_dir=tmp_path)).read_text()
    assert "## Search history" in readme and token not in readme
    assert "3 search trials and 1 baseline" in readme and "demo-lab/eval-text@" in readme
    assert "It was chosen among the best search trials and the baselines (4 finalists)" in readme
    assert "weight tiny-math" in readme and "base_model:" in readme
