"""A user asks for a merge in a discussion; the repo appears with the right weights, files and card."""

from __future__ import annotations

from pathlib import Path

import torch
from botkit import BOT, RECIPE, BotFactory, World, finished_job, merge_command, wait_for
from huggingface_hub import ModelCard
from huggingface_hub.community import DiscussionComment
from safetensors.torch import load_file

from engine import load_recipe, run_merge


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def bot_comments(world: World, repo: str, num: int) -> list[DiscussionComment]:
    details = world.alice.get_discussion_details(repo, num)
    return [e for e in details.events if isinstance(e, DiscussionComment) and e.author == BOT]


def test_merge_from_a_discussion_end_to_end(world: World, serve_bot: BotFactory, tmp_path: Path) -> None:
    server = serve_bot()
    discussion = world.alice.create_discussion(
        f"{BOT}/requests", "Please merge", description=merge_command("e2e-ties", RECIPE)
    )
    job = finished_job(server.bot, f"{BOT}/e2e-ties")
    assert job.state == "succeeded", job.reason
    assert job.spec.requester == "alice"
    # every parent pinned to a commit in the stored spec
    assert all("@" in ref for ref in load_recipe(job.spec.recipe_yaml).referenced_models())

    # ONE status comment, edited: queued -> running -> done with a link
    status = wait_for(
        lambda: [c for c in bot_comments(world, f"{BOT}/requests", discussion.num) if "is done" in c.content],
        what="the done comment",
    )
    assert len(bot_comments(world, f"{BOT}/requests", discussion.num)) == 1
    history = [h["raw"] for h in status[0].edit_history][::-1]  # oldest first
    assert "queued" in history[0] and "position 1" in history[0]
    assert any("running" in h for h in history)
    assert any("% merged" in h for h in history)
    assert f"[{BOT}/e2e-ties]({world.hub.endpoint}/{BOT}/e2e-ties)" in history[-1]

    # the repo: shards (several: 40 kB shards), index, config, tokenizer, recipe, card, in one commit
    repo = f"{BOT}/e2e-ties"
    files = set(world.alice.list_repo_files(repo))
    assert {
        "config.json",
        "tokenizer.json",
        "mergekit_config.yml",
        "README.md",
        "model.safetensors.index.json",
        "merge_report.json",
        "merge_anatomy.png",
    } <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    commits = world.alice.list_repo_commits(repo)
    assert len([c for c in commits if f"mergebot-job: {job.id}" in c.title]) == 1
    assert len(commits) == 2  # the repo's initial commit and the merge, nothing half-written in between

    # the card: metadata the Hub parses, license aggregated (mit + apache -> apache-2.0), lineage
    text = (Path(world.alice.hf_hub_download(repo, "README.md", local_dir=tmp_path / "dl"))).read_text()
    card = ModelCard(text)
    assert card.data.base_model == ["acme/base", "alice/ft-mit", "bob/ft-apache"]
    assert card.data.base_model_relation == "merge"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers"
    assert set(card.data.tags) >= {"merge", "mergekit", "mergebot", "ties"}
    assert "```mermaid" in text and "acme/grandbase" in text  # two generations up
    assert "![merge anatomy](merge_anatomy.png)" in text
    assert "bob/missing-parent" in text  # a missing ancestor is shown, not followed
    assert "| base |" in text and "0.6" in text and "0.5" in text
    info = world.alice.model_info(repo)
    assert any(t == "base_model:merge:acme/base" for t in info.tags or [])

    # the weights equal a local run_merge of the same recipe on the same folders
    family = world.family
    local = RECIPE.replace("acme/base", str(family.base))
    local = local.replace("alice/ft-mit", str(family.finetunes[0])).replace(
        "bob/ft-apache", str(family.finetunes[1])
    )
    run_merge(load_recipe(local), tmp_path / "local")
    world.alice.snapshot_download(repo, local_dir=tmp_path / "pushed")
    pushed, expected = tensors(tmp_path / "pushed"), tensors(tmp_path / "local")
    assert pushed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(pushed[name], tensor), name
