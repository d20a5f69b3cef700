"""`@mergebot evolve`: a search file in a discussion becomes a job in the same queue, reports its trials
in the status comment, and publishes the best merge with its search history on the card."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from botkit import BOT, BotFactory, World, card, finished_job, make_settings, wait_for
from huggingface_hub.community import DiscussionComment
from tiny_models import _CORPUS_WORDS

from bot.errors import BotError
from bot.evolve import DataRef, parse_data_ref
from bot.service import Bot
from engine import MergeError, load_recipe

EVAL = "hf://datasets/alice/eval-text/eval.txt"


def search_file(data: str = EVAL, extra: str = "", validation: str = "") -> str:
    return (
        "method: ties\nbase_model: acme/base\nmodels: [alice/ft-mit, bob/ft-apache]\n"
        "parameters:\n  weight: {min: 0.1, max: 1.0}\n  density: {min: 0.3}\n"
        f"evaluation: {{kind: perplexity, data: '{data}', search_size: 3, report_size: 3, block_size: 24{validation}}}\n"
        f"budget: {{trials: 2}}\nbaselines: [linear]\nseed: 0\n{extra}"
    )


@pytest.fixture(scope="module")
def eval_repo(world: World) -> str:
    rng = random.Random(0)
    text = " ".join(rng.choice(_CORPUS_WORDS) for _ in range(600))
    if not world.alice.repo_exists("alice/eval-text", repo_type="dataset"):
        world.alice.create_repo("alice/eval-text", repo_type="dataset")
        world.alice.upload_file(
            path_or_fileobj=text.encode(),
            path_in_repo="eval.txt",
            repo_id="alice/eval-text",
            repo_type="dataset",
        )
        world.alice.create_repo("alice/no-tokenizer")
        world.alice.upload_folder(
            repo_id="alice/no-tokenizer",
            folder_path=str(world.family.base),
            ignore_patterns=["tokenizer*", "special_tokens_map.json", "README.md"],
        )
        world.alice.upload_file(
            path_or_fileobj=card("mit"), path_in_repo="README.md", repo_id="alice/no-tokenizer"
        )
    return EVAL


def test_data_references_follow_one_convention() -> None:
    assert parse_data_ref("hf://datasets/org/eval/data/qa.jsonl") == DataRef(
        "dataset", "org/eval", None, "data/qa.jsonl"
    )
    assert parse_data_ref("hf://org/model@v1.0/eval.txt") == DataRef("model", "org/model", "v1.0", "eval.txt")
    assert str(DataRef("dataset", "org/eval", "abc", "x.txt")) == "hf://datasets/org/eval@abc/x.txt"
    for bad in ("eval.txt", "/tmp/eval.txt", "hf://org/eval", "hf://datasets/org/eval/../x", 3, None):
        with pytest.raises(BotError, match=r"hf://datasets/org/name/path\.jsonl"):
            parse_data_ref(bad)


def test_preflight_refuses_with_a_clear_reason(world: World, serve_bot: BotFactory, eval_repo: str) -> None:
    bot = serve_bot(run_jobs=False, webhook=False).bot
    cases = {
        search_file(data="eval.txt"): "must be a file in a Hub repo",
        search_file(data="hf://datasets/alice/eval-text/missing.txt"): "has no file `missing.txt`",
        search_file(data="hf://datasets/alice/nope/eval.txt"): "`datasets/alice/nope` does not exist",
        search_file(data="hf://acme/base@nope/eval.txt"): "`acme/base` has no revision `nope`",
        search_file(extra="storage: sqlite:///x.db\n"): "remove `storage`",
        search_file().replace("trials: 2", "trials: 5000"): "at most 50 trials",
        search_file().replace("alice/ft-mit", "./local/model"): "is not a Hub repo id",
        search_file().replace("alice/ft-mit", "alice/nope"): "`alice/nope` does not exist",
        search_file().replace("base_model: acme/base", "base_model: alice/no-tokenizer"): "has no tokenizer",
        search_file().replace("density: {min: 0.3}", "density: {min: 3}"): "parameters.density.min",
        search_file().replace("kind: perplexity", "kind: lm_eval"): "lm-eval tasks can run code",
        "method: [\n": "not valid YAML",
    }
    for text, expected in cases.items():
        with pytest.raises((BotError, MergeError)) as err:
            bot.evolve(text, name="refused", user="alice")
        assert expected in str(err.value), (text, str(err.value))
        assert "/tmp" not in str(err.value)  # the engine's checks ran on stand-ins, named back
    assert bot.store.all() == []


def test_evolve_from_a_discussion_publishes_the_best_merge_with_its_history(
    world: World, serve_bot: BotFactory, eval_repo: str, tmp_path: Path
) -> None:
    server = serve_bot()
    search = search_file(validation=", validation_size: 3, finalists: 2")
    text = f"Please search.\n\n@{BOT} evolve --name evolved\n```yaml\n{search}```\n"
    discussion = world.alice.create_discussion(f"{BOT}/requests", "Evolve", description=text)
    job = finished_job(server.bot, f"{BOT}/evolved", timeout=180)
    assert job.state == "succeeded", job.reason
    assert job.spec.kind == "evolve" and job.spec.search_yaml is not None
    assert "acme/base@" in job.spec.search_yaml and "hf://datasets/alice/eval-text@" in job.spec.search_yaml
    assert not (server.bot.settings.work_dir / f"evolve-{job.id}").exists()  # cleaned up once done

    repo = f"{BOT}/evolved"
    files = set(world.alice.list_repo_files(repo))
    assert {"README.md", "config.json", "mergekit_config.yml", "search.yml", "score_vs_trial.png"} <= files
    assert any(f.endswith(".safetensors") for f in files)
    readme = Path(world.alice.hf_hub_download(repo, "README.md", local_dir=tmp_path)).read_text()
    assert "## Search history" in readme and "2 search trials and 1 baseline," in readme
    assert "| baseline: linear |" in readme and "best (this model)" in readme
    assert "It was chosen among the best search trials and the baselines (3 finalists)" in readme
    chosen = readme.split("It was chosen among", 1)[1].split("| recipe |", 1)[0]
    finalists = [line for line in chosen.splitlines() if re.match(r"\| (trial \d+|baseline: linear)", line)]
    assert len(finalists) == 3 and sum("(this model)" in line for line in finalists) == 1
    assert "weight ft-mit" in readme and "![score against trial](score_vs_trial.png)" in readme
    assert "evolutionary-merge" in readme and str(server.bot.settings.data_dir) not in readme
    recipe = load_recipe(
        Path(world.alice.hf_hub_download(repo, "mergekit_config.yml", local_dir=tmp_path)).read_text()
    )
    assert all(
        ref.split("@")[0] in ("acme/base", "alice/ft-mit", "bob/ft-apache")
        for ref in recipe.referenced_models()
    )

    def status_history() -> list[str]:
        events = world.alice.get_discussion_details(f"{BOT}/requests", discussion.num).events
        mine = [e for e in events if isinstance(e, DiscussionComment) and e.author == BOT]
        return [h["raw"] for c in mine for h in c.edit_history]

    history = wait_for(lambda: (h := status_history()) and any("is done" in x for x in h) and h, what="done")
    assert any("trial 1/3" in h for h in history) and any("best " in h for h in history)
    assert "3 search trials" not in history[-1]


def test_a_cancelled_search_stops_after_its_trial_and_publishes_nothing(
    world: World, serve_bot: BotFactory, eval_repo: str
) -> None:
    bot = serve_bot(webhook=False).bot
    job = bot.evolve(search_file().replace("trials: 2", "trials: 30"), name="cancelled-search", user="alice")
    wait_for(lambda: job.id in bot.store.notes(), timeout=60, what="a first trial")
    assert "stopping" in bot.cancel_job(job.id)
    done = finished_job(bot, f"{BOT}/cancelled-search")
    assert done.state == "cancelled"
    assert not world.alice.repo_exists(f"{BOT}/cancelled-search")
    assert not (bot.settings.work_dir / f"evolve-{job.id}").exists()


def test_a_search_stopped_by_a_restart_continues_its_study(
    world: World, eval_repo: str, tmp_path: Path
) -> None:
    settings = make_settings(world, tmp_path / "bot")
    first = Bot(settings)
    first.start()
    job = first.evolve(search_file().replace("trials: 2", "trials: 4"), name="restarted-search", user="alice")
    wait_for(lambda: "trial 2/" in first.store.notes().get(job.id, ""), timeout=60, what="two trials")
    first.stop()  # the running trial ends, is recorded, and the job goes back to the queue
    work = settings.work_dir / f"evolve-{job.id}"
    assert first.store.get(job.id).state == "queued"  # type: ignore[union-attr]
    assert (work / "study.db").exists()  # kept: the study continues
    second = Bot(settings)
    second.start()
    try:
        done = finished_job(second, f"{BOT}/restarted-search", timeout=120)
        assert done.state == "succeeded", done.reason
        # counted over the study: the resumed run goes on to 5/5, the finished trials are not run again
        assert second.store.notes()[job.id].startswith("trial 5/5 ")
    finally:
        second.stop()
    readme = Path(
        world.alice.hf_hub_download(f"{BOT}/restarted-search", "README.md", local_dir=tmp_path)
    ).read_text()
    assert "4 search trials and 1 baseline," in readme and not work.exists()


def test_every_number_of_a_search_is_bounded(world: World, serve_bot: BotFactory, eval_repo: str) -> None:
    bot = serve_bot(run_jobs=False, webhook=False).bot
    exact = search_file().replace("kind: perplexity", "kind: exact_match").replace(", block_size: 24", "")
    cases = {
        search_file().replace("search_size: 3", "search_size: 100000000"): "evaluation.search_size: this bot allows at most",
        search_file().replace("report_size: 3", "report_size: 100000000"): "evaluation.report_size: this bot allows at most",
        search_file(validation=", validation_size: 3, finalists: 100000"): "evaluation.finalists: this bot allows at most",
        search_file(validation=", validation_size: 100000000"): "evaluation.validation_size: this bot allows at most",
        search_file().replace("block_size: 24", "block_size: 100000000"): "evaluation.block_size: this bot allows at most",
        search_file().replace("block_size: 24", "block_size: 24, batch_size: 100000"): "evaluation.batch_size: this bot allows at most",
        exact.replace("report_size: 3", "report_size: 3, max_new_tokens: 1000000000"): "evaluation.max_new_tokens: this bot allows at most",
        search_file().replace("trials: 2", "trials: 2, minutes: 100000"): "stops any job after 120 minutes",
    }
    for text, expected in cases.items():
        with pytest.raises(MergeError) as err:
            bot.evolve(text, name="unbounded", user="bob")
        assert expected in str(err.value), (text, str(err.value))
    assert bot.store.all() == []


def test_search_data_is_read_with_the_requesters_rights_and_size_capped(
    world: World, serve_bot: BotFactory, eval_repo: str
) -> None:
    if not world.bot_api.repo_exists(f"{BOT}/private-eval", repo_type="dataset"):
        world.bot_api.create_repo(f"{BOT}/private-eval", repo_type="dataset", private=True)
        world.bot_api.upload_file(
            path_or_fileobj=b"some words to score\n" * 20,
            path_in_repo="eval.txt",
            repo_id=f"{BOT}/private-eval",
            repo_type="dataset",
        )
    bot = serve_bot(run_jobs=False, webhook=False, max_evolve_data_bytes=1000).bot
    with pytest.raises(BotError, match=f"`datasets/{BOT}/private-eval` is not public"):
        bot.evolve(search_file(data=f"hf://datasets/{BOT}/private-eval/eval.txt"), name="peek", user="bob")
    with pytest.raises(BotError, match=r"above this bot's limit of 1\.0 kB"):  # eval.txt is a few kB
        bot.evolve(search_file(), name="too-much-data", user="bob")
    with pytest.raises(BotError, match="A private result must go to your own namespace"):
        bot.evolve(search_file(data=f"hf://datasets/{BOT}/private-eval/eval.txt"), name="p", user="bob", private=True)
    assert bot.store.all() == []
