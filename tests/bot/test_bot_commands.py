"""The discussion-text parser: examples, and properties (never raises; generated commands round-trip)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.commands import Cancel, Evolve, Help, Invalid, Merge, Remerge, Status, parse, render, usage

BOT = "mergebot"
RECIPE = "merge_method: linear\nmodels:\n  - model: a/b\n"


def test_merge_with_flags_and_recipe() -> None:
    text = f"Hi!\n@{BOT} merge --name my-merge --private --accept-license\n\n```yaml\n{RECIPE}```\nthanks"
    assert parse(text, BOT) == Merge(name="my-merge", recipe=RECIPE, private=True, accept_license=True)
    assert parse(f"@{BOT} merge --name=x\n```yml\n{RECIPE}```", BOT) == Merge("x", RECIPE)
    assert parse(f"@MergeBot merge --name x\n```\n{RECIPE}```", BOT) == Merge("x", RECIPE)


def test_merge_takes_force_and_evolve_does_not() -> None:
    assert parse(f"@{BOT} merge --name x --force\n```yaml\n{RECIPE}```", BOT) == Merge(
        "x", RECIPE, force=True
    )
    assert parse(f"@{BOT} merge --force --name x\n```yaml\n{RECIPE}```", BOT) == Merge(
        "x", RECIPE, force=True
    )
    assert render(Merge("x", RECIPE, force=True), BOT).startswith(f"@{BOT} merge --name x --force\n")
    refused = parse(f"@{BOT} evolve --name x --force\n```yaml\n{RECIPE}```", BOT)
    assert isinstance(refused, Invalid) and "`evolve` does not take `--force`" in refused.problem
    assert "--force" in usage(BOT)


def test_evolve_takes_the_merge_flags_and_a_search_file() -> None:
    search = "method: ties\nbase_model: a/base\nmodels: [a/b]\n"
    text = f"@{BOT} evolve --name evolved --private\n```yaml\n{search}```"
    assert parse(text, BOT) == Evolve(name="evolved", search=search, private=True)
    missing = parse(f"@{BOT} evolve --name x", BOT)
    assert isinstance(missing, Invalid) and "search file" in missing.problem
    wrong = parse(f"@{BOT} evolve --trials 3", BOT)
    assert isinstance(wrong, Invalid) and "`evolve` does not take" in wrong.problem
    assert "hf://datasets/" in usage(BOT) and f"@{BOT} evolve" in usage(BOT)


def test_simple_commands() -> None:
    assert parse(f"@{BOT} status", BOT) == Status()
    assert parse(f"@{BOT} help", BOT) == Help()
    assert parse(f"@{BOT} remerge", BOT) == Remerge()
    assert parse(f"@{BOT} cancel", BOT) == Cancel()
    assert parse(f"@{BOT} cancel abc123", BOT) == Cancel("abc123")
    assert parse(f"> quoted\n  @{BOT} status\n", BOT) == Status()


def test_text_not_addressed_to_the_bot_is_ignored() -> None:
    assert parse("please merge these", BOT) is None
    assert parse(f"thanks @{BOT}!", BOT) is None  # a mention inside a sentence is not a command
    assert parse(f"@{BOT}ter status", BOT) is None
    assert parse(f"@{BOT}-two status", BOT) is None


def test_the_bot_never_answers_itself() -> None:
    assert parse(f"@{BOT} help", BOT, author=BOT) is None
    assert parse(f"@{BOT} help", BOT, author="MergeBot") is None


def test_mistakes_get_a_reason() -> None:
    cases = {
        f"@{BOT}": "no command",
        f"@{BOT} merge": "needs `--name",
        f"@{BOT} merge --name": "needs a value",
        f"@{BOT} merge --name a --name b\n```yaml\nx: 1\n```": "twice",
        f"@{BOT} merge --name a --fast": "does not take `--fast`",
        f"@{BOT} merge --name ../etc": "not a valid repo name",
        f"@{BOT} merge --name a": "fenced",
        f"@{BOT} merge --name a\n```yaml\n\n```": "empty",
        f"@{BOT} status now": "takes no arguments",
        f"@{BOT} cancel a b": "at most one",
        f"@{BOT} cancel ../x": "not a job id",
        f"@{BOT} dance": "not a command I know",
    }
    for text, expected in cases.items():
        result = parse(text, BOT)
        assert isinstance(result, Invalid), text
        assert expected in result.problem, (text, result.problem)


def test_usage_has_an_example() -> None:
    text = usage(BOT)
    assert f"@{BOT} merge --name" in text and "```yaml" in text and "merge_method" in text


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from([BOT, "other-bot"]), st.one_of(st.none(), st.text(max_size=10)))
def test_never_raises(text: str, bot: str, author: str | None) -> None:
    parse(text, bot, author)
    parse(f"@{bot} {text}", bot, author)
    parse(f"@{bot} merge --name x\n```yaml\n{text}", bot, author)
    parse(f"@{bot} evolve --name x\n```yaml\n{text}", bot, author)


names = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9_]{0,20}[A-Za-z0-9])?", fullmatch=True)
recipes = st.text(
    alphabet=st.characters(blacklist_characters="`\r", blacklist_categories=("Cs",)), min_size=1
).filter(lambda t: t.strip() != "")
commands = st.one_of(
    st.builds(
        Merge,
        name=names,
        recipe=recipes.map(lambda t: t if t.endswith("\n") else t + "\n"),
        private=st.booleans(),
        accept_license=st.booleans(),
        force=st.booleans(),
    ),
    st.builds(
        Evolve,
        name=names,
        search=recipes.map(lambda t: t if t.endswith("\n") else t + "\n"),
        private=st.booleans(),
        accept_license=st.booleans(),
    ),
    st.just(Status()),
    st.just(Help()),
    st.just(Remerge()),
    st.builds(Cancel, st.one_of(st.none(), st.from_regex(r"[a-f0-9]{12}", fullmatch=True))),
)


@settings(max_examples=300, deadline=None)
@given(commands, st.text(alphabet=st.characters(blacklist_characters="@`"), max_size=40))
def test_generated_commands_round_trip(
    command: Merge | Evolve | Status | Help | Remerge | Cancel, preamble: str
) -> None:
    text = render(command, BOT)
    assert parse(text, BOT) == command
    assert parse(f"{preamble}\n{text}", BOT) == command
