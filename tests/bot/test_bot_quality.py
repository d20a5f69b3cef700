"""The quality check in the bot: its figures in the comment and the card; a failing merge is
published only with `--force`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from botkit import BOT, BotFactory, World, card, finished_job, merge_command, upload_model, wait_for
from huggingface_hub import ModelCard
from huggingface_hub.community import DiscussionComment
from safetensors.torch import load_file, save_file

NOISE = "alice/ft-noise"


@pytest.fixture(scope="module")
def noise_parent(world: World, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A parent of the family's shape whose weights are unit-variance noise: merging it breaks the model."""
    folder = tmp_path_factory.mktemp("noise") / "ft-noise"
    shutil.copytree(world.family.finetunes[0], folder)
    generator = torch.Generator().manual_seed(3)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        noise = {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in tensors.items()}
        save_file(noise, shard, metadata={"format": "pt"})
    upload_model(world.alice, NOISE, folder, card("mit", "acme/base"))
    return NOISE


def recipe(*models: str) -> str:
    rows = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models)
    return f"merge_method: linear\nmodels:\n{rows}dtype: float32\n"


def final_comment(world: World, num: int, word: str) -> str:
    def find() -> str | None:
        details = world.alice.get_discussion_details(f"{BOT}/requests", num)
        texts = [e.content for e in details.events if isinstance(e, DiscussionComment) and e.author == BOT]
        return next((t for t in texts if word in t), None)

    found: str = wait_for(find, what=f"a comment saying {word!r}")
    return found


def ask(world: World, text: str) -> int:
    return world.alice.create_discussion(f"{BOT}/requests", "A request", description=text).num


def test_a_sane_merge_is_published_with_its_figures(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    num = ask(world, merge_command("quality-good", recipe("alice/ft-mit", "bob/ft-apache")))
    job = finished_job(server.bot, f"{BOT}/quality-good")
    assert job.state == "succeeded", job.reason
    done = final_comment(world, num, "is done")
    assert "Quality check: **passed**" in done and "| this merge |" in done and "--force" not in done
    assert "| `alice/ft-mit@" in done and "| `bob/ft-apache@" in done  # the parents, read from the Hub
    readme = Path(world.alice.hf_hub_download(f"{BOT}/quality-good", "README.md"))
    loaded = ModelCard.load(readme, ignore_metadata_errors=False)
    (result,) = loaded.data.eval_results
    assert result.task_type == "text-generation" and result.metric_type == "perplexity"
    assert result.dataset_name == "mergebot quality text" and 1 < result.metric_value < 1e4
    assert "## Quality check" in loaded.text


def test_a_broken_merge_is_published_only_with_force(
    world: World, serve_bot: BotFactory, noise_parent: str
) -> None:
    server = serve_bot()
    broken = recipe("alice/ft-mit", noise_parent)
    num = ask(world, merge_command("quality-bad", broken))
    job = finished_job(server.bot, f"{BOT}/quality-bad")
    assert job.state == "failed" and "quality check" in (job.reason or "")
    reply = final_comment(world, num, "failed")
    assert "perplexity" in reply and "Nothing was published" in reply and "`--force`" in reply
    assert not world.alice.repo_exists(f"{BOT}/quality-bad")

    num = ask(world, merge_command("quality-bad", broken, " --force"))
    job = wait_for(
        lambda: (j := server.bot.store.all_for(f"{BOT}/quality-bad")[-1]).state == "succeeded" and j,
        60,
        "the forced job",
    )
    assert job.spec.force
    done = final_comment(world, num, "is done")
    assert "Published despite failing its quality check" in done and "**failed**" in done
    readme = Path(world.alice.hf_hub_download(f"{BOT}/quality-bad", "README.md"))
    loaded = ModelCard.load(readme, ignore_metadata_errors=False)
    assert "despite the failed check" in loaded.text
    (result,) = loaded.data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value > 1
