"""Strangers' input through the discussion: bounded parsing, escaped replies, no disk oracle, odd ids.

Every hostile request gets a one-line reason in a reply that renders as the bot wrote it,
and nothing is queued.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from botkit import (
    BOT,
    BOT_TOKEN,
    RECIPE,
    BotFactory,
    World,
    card,
    finished_job,
    merge_command,
    upload_model,
    wait_for,
)
from test_bot_discussions import ask, wait_reply

from bot.errors import PreflightError
from bot.hub import Hub

LINEAR = (
    "merge_method: linear\nmodels:\n  - model: acme/base\n    parameters: {weight: 1}\n"
    "  - model: alice/ft-mit\n    parameters: {weight: 1}\n"
)


def live_mentions(text: str) -> set[str]:
    """The names a Hub comment would notify: ``@name`` not inside a word or a repo reference."""
    return {m.lower() for m in re.findall(r"(?<![\w@/.\-])@([A-Za-z0-9][\w.\-]*)", text)}


def code_blocks(text: str) -> list[tuple[int, int]]:
    """(first, last) line numbers of each fenced block's content, closed as CommonMark closes them."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        opening = re.match(r"^(`{3,})", lines[i])
        if opening is None:
            i += 1
            continue
        fence, j = opening.group(1), i + 1
        while j < len(lines) and not re.fullmatch(rf"`{{{len(fence)},}}\s*", lines[j]):
            j += 1
        blocks.append((i + 1, j - 1))
        i = j + 1
    return blocks


def test_an_alias_bomb_in_a_comment_is_refused_and_nothing_is_queued(
    world: World, serve_bot: BotFactory
) -> None:
    server = serve_bot()
    bomb = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 11)]
    (reply,) = wait_reply(world, ask(world, merge_command("bomb", LINEAR + "\n".join(bomb) + "\n")))
    assert "could not use that recipe" in reply and "anchors and aliases" in reply
    assert server.bot.store.all() == []


def test_a_nan_weight_is_refused_and_nothing_is_queued(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot()
    recipe = LINEAR.replace("{weight: 1}", "{weight: .nan}", 1)
    (reply,) = wait_reply(world, ask(world, merge_command("nan-weight", recipe)))
    assert "models[0].parameters.weight (line 4): `.nan` is not a finite number" in reply
    assert server.bot.store.all() == []


def test_a_fence_in_a_recipe_key_stays_inside_the_bot_s_code_block(
    world: World, serve_bot: BotFactory
) -> None:
    serve_bot(run_jobs=False)  # the queued comment, which quotes the recipe's notes, stays as written
    injected = '"x\\n```\\n# Approved by the bot\\n[claim your prize](http://evil.example)\\n```\\n": 1\n'
    (reply,) = wait_reply(world, ask(world, merge_command("fence", LINEAR + injected)))
    lines = reply.splitlines()
    heading = lines.index("# Approved by the bot")
    link = next(n for n, line in enumerate(lines) if line.startswith("[claim your prize]"))
    assert any(first <= heading <= last and first <= link <= last for first, last in code_blocks(reply)), (
        reply
    )
    assert "has no effect" in reply  # mergekit ignores unknown keys; the bot notes them


def test_a_mention_in_the_name_is_not_a_live_mention(world: World, serve_bot: BotFactory) -> None:
    serve_bot()
    num = ask(world, f"@{BOT} merge --name x`@bob`y\n```yaml\n{LINEAR}```\n")
    (reply,) = wait_reply(world, num)
    assert "is not a valid repo name" in reply and "bob" in reply
    assert "bob" not in live_mentions(reply)


def test_paths_on_the_bot_s_disk_get_the_same_answer_as_missing_ones(
    world: World, serve_bot: BotFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "bot.sqlite").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # the bot's working directory holds secret/bot.sqlite
    server = serve_bot()
    answers = []
    for name, path in (("there", "secret/bot.sqlite"), ("missing", "secret/nothing.sqlite")):
        recipe = LINEAR.replace("alice/ft-mit", path)
        (reply,) = wait_reply(world, ask(world, merge_command(name, recipe)))
        answers.append(reply.replace(path, "PATH"))
    assert answers[0] == answers[1] and "does not exist on the Hub" in answers[0]
    assert server.bot.store.all() == []


@pytest.mark.parametrize("model", ["alice/.", "alice/-x", "alice/x@rev\\n# heading"])
def test_an_odd_repo_id_gets_a_clear_message(world: World, serve_bot: BotFactory, model: str) -> None:
    server = serve_bot()
    recipe = LINEAR.replace("alice/ft-mit", f'"{model}"')
    (reply,) = wait_reply(world, ask(world, merge_command("odd-id", recipe)))
    assert "is not a Hub repo id" in reply and "went wrong" not in reply
    assert "\n# heading" not in reply
    assert server.bot.store.all() == []


def test_hub_refuses_odd_ids_with_clear_errors_and_drops_odd_base_models(world: World) -> None:
    upload_model(world.alice, "alice/odd-card", None, card("mit", '"not a repo id <img src=x>"'))
    hub = Hub(world.hub.endpoint, BOT_TOKEN)
    assert hub.repo_facts("alice/odd-card").base_models == ()
    lineage = hub.lineage(["alice/odd-card"], depth=3)
    assert [(n.repo_id, n.parents, n.missing) for n in lineage.nodes] == [("alice/odd-card", (), False)]
    with pytest.raises(PreflightError, match="is not a Hub repo id"):
        hub.repo_facts("alice/.")


def test_a_parent_whose_card_names_an_odd_base_model_merges_and_the_card_skips_it(
    world: World, serve_bot: BotFactory
) -> None:
    upload_model(
        world.alice,
        "alice/ft-odd-parent",
        world.family.finetunes[0],
        card("mit", '"not a repo id <img src=x>"'),
    )
    server = serve_bot()
    ask(world, merge_command("odd-parent-merge", RECIPE.replace("alice/ft-mit", "alice/ft-odd-parent")))
    job = finished_job(server.bot, f"{BOT}/odd-parent-merge")
    assert job.state == "succeeded", job.reason
    readme = Path(world.alice.hf_hub_download(f"{BOT}/odd-parent-merge", "README.md")).read_text()
    assert "alice/ft-odd-parent" in readme and "<img" not in readme and "not a repo id" not in readme


def test_a_failure_reason_in_the_status_table_stays_in_its_cell(world: World, serve_bot: BotFactory) -> None:
    server = serve_bot(run_jobs=False)
    num = ask(world, merge_command("status-cell", RECIPE))
    wait_for(lambda: server.bot.store.all(), what="a job")
    (job,) = server.bot.store.all()
    server.bot.store.finish(job.id, "failed", reason="tensor `x` | @bob [win](http://evil.example)\nmore")
    world.alice.comment_discussion(f"{BOT}/requests", num, f"@{BOT} status")
    status = wait_reply(world, num, 2)[1]
    row = next(line for line in status.splitlines() if job.id in line)
    assert row.endswith("|") and row.count(" | ") == 2  # the reason's `|` is escaped: still three cells
    assert "bob" in row and "bob" not in live_mentions(status) and "[win](http" not in row


def test_an_alias_bomb_search_file_in_an_evolve_command_is_refused(
    world: World, serve_bot: BotFactory
) -> None:
    server = serve_bot()
    bomb = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 11)]
    body = "method: linear\n" + "\n".join(bomb) + "\n"
    (reply,) = wait_reply(world, ask(world, f"@{BOT} evolve --name evolve-bomb\n```yaml\n{body}```\n"))
    assert "could not use that search file" in reply and "anchors and aliases" in reply
    assert server.bot.store.all() == []
