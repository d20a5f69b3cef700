"""The Space's Evolve tab at the service and view level: check a search file (what is searched, what is
wrong), submit it to the bot's queue, and watch its trials in the queue view.

The demo's models have no tokenizer, which a search needs to score merges: the test adds tiny Llama
models with one, and an evaluation text, to the demo hub as the demo user.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from pydantic import SecretStr
from tiny_models import _CORPUS_WORDS, Family

from bot.credentials import UserCredential
from mergebot.demo import DEMO_USER, DemoStack, demo_stack
from space.compose import example_search
from space.service import SearchCheck, SpaceService
from space.views import queue_html, queue_rows, search_check_markdown

pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")]
DATA = f"hf://datasets/{DEMO_USER}/eval-text/eval.txt"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, llama_family: Family) -> Iterator[DemoStack]:
    data = tmp_path_factory.mktemp("space-evolve")
    with demo_stack(data, progress_interval_s=0.05) as s:
        api = HfApi(endpoint=s.hub_url, token=(data / "secrets" / "user-token").read_text().strip())
        card = b"---\nlicense: apache-2.0\n---\n# tiny\n"
        for name, folder in (
            ("evo-base", llama_family.base),
            *zip(("evo-a", "evo-b"), llama_family.finetunes[:2], strict=True),
        ):
            api.create_repo(f"{DEMO_USER}/{name}")
            api.upload_folder(
                repo_id=f"{DEMO_USER}/{name}", folder_path=str(folder), ignore_patterns=["README.md"]
            )
            api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=f"{DEMO_USER}/{name}")
        rng = random.Random(0)
        api.create_repo(f"{DEMO_USER}/eval-text", repo_type="dataset")
        api.upload_file(
            path_or_fileobj=" ".join(rng.choice(_CORPUS_WORDS) for _ in range(600)).encode(),
            path_in_repo="eval.txt",
            repo_id=f"{DEMO_USER}/eval-text",
            repo_type="dataset",
        )
        yield s


def search(**more: str) -> str:
    text = example_search(f"{DEMO_USER}/evo-base", [f"{DEMO_USER}/evo-a", f"{DEMO_USER}/evo-b"], DATA)
    text = text.replace("budget: {trials: 4}", "budget: {trials: 2}").replace("[linear, ties]", "[linear]")
    text = text.replace("search_size: 8", "search_size: 3").replace("report_size: 8", "report_size: 3")
    for old, new in more.items():
        text = text.replace(old, new)
    return text


def test_check_lists_the_searched_parameters_or_every_problem(stack: DemoStack) -> None:
    service = SpaceService(stack.bot)
    ok = service.check_search(search(), name="evolved-check")
    assert ok.ok, ok.problems
    assert ok.destination == "mergebot/evolved-check" and ok.trials == 2 and ok.baselines == ("linear",)
    assert ok.dimensions == ("weight evo-a", "weight evo-b", "density evo-a", "density evo-b")
    shown = search_check_markdown(ok)
    assert "Ready to search" in shown and "| 3 | density evo-a |" in shown and "perplexity on" in shown

    demo = example_search(
        stack.models[0], list(stack.models[1:3]), "hf://datasets/demo-lab/eval-text/eval.txt"
    )
    refused = service.check_search(demo, name="demo-evolve")
    assert not refused.ok and refused.dimensions  # still shows what would be searched
    assert any("has no tokenizer" in p or "does not exist" in p for p in refused.problems)
    bad = service.check_search(search(**{"min: 0.2": "min: 2"}), name="bad name!")
    assert not bad.ok and "not a valid repo name" in bad.problems[0] and "density" in bad.problems[1]
    assert "cannot be submitted" in search_check_markdown(bad)
    assert "cannot be submitted" in search_check_markdown(SearchCheck(problems=("x",)))


def test_submit_runs_in_the_queue_with_trial_progress_and_lands_in_the_users_namespace(
    stack: DemoStack, tmp_path: Path
) -> None:
    service = SpaceService(stack.bot)
    token = (Path(stack.bot.settings.data_dir).parent / "secrets" / "user-token").read_text().strip()
    job = service.submit_search(
        search(), name="evolved", signed_in=UserCredential(DEMO_USER, SecretStr(token))
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
