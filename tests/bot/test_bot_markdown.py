"""Strangers' text in the bot's markdown: it renders as that text, closes nothing, notifies no one."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from bot.cards import build_context, render_card
from bot.hub import Lineage, RepoFacts
from bot.licenses import ParentLicense, decide
from bot.markdown import ZWJ, code_block, code_span, prose, quiet_mentions, web_link


def span_text(span: str) -> str:
    """What CommonMark shows for one code span: the text between the runs, one padding space stripped."""
    ticks = len(re.match("`+", span).group(0))  # type: ignore[union-attr]
    inner = span[ticks:-ticks]
    return inner[1:-1] if inner.startswith(" ") and inner.endswith(" ") and inner.strip() else inner


@given(st.text(max_size=60))
def test_a_code_span_is_one_line_and_longer_ticks_than_any_run_inside(text: str) -> None:
    span = code_span(text)
    assert "\n" not in span and "\r" not in span
    ticks = len(re.match("`+", span).group(0))  # type: ignore[union-attr]
    assert ticks > max((len(r) for r in re.findall("`+", span[ticks:-ticks])), default=0)
    if not re.search(r"[\x00-\x1f\x7f]", text) and text.strip():
        assert span_text(span) == text


def test_code_span_shows_control_characters_and_cuts_long_text() -> None:
    assert code_span("a\n# b") == "`a\\x0a# b`"
    assert code_span("`x`") == "`` `x` ``"
    assert code_span("y" * 500).endswith("…`") and len(code_span("y" * 500)) < 210


@given(st.text(max_size=200))
def test_no_line_of_a_code_block_closes_it_early(text: str) -> None:
    block = code_block(text, "yaml").split("\n")
    fence = re.match("`+", block[0]).group(0)  # type: ignore[union-attr]
    assert block[0] == fence + "yaml" and block[-1] == fence and len(fence) >= 3
    assert not any(re.fullmatch(rf"\s{{0,3}}`{{{len(fence)},}}\s*", line) for line in block[1:-1])


def test_mentions_go_inert_except_the_names_kept() -> None:
    text = "@alice asked; cc @bob, `@Carol`, (@dave) and x`@eve`; org/name@main and a@b.c stay"
    quiet = quiet_mentions(text, keep=("ALICE",))
    assert quiet.startswith("@alice asked")
    for name in ("bob", "Carol", "dave", "eve"):
        assert f"@{ZWJ}{name}" in quiet
    assert "org/name@main" in quiet and "a@b.c" in quiet


def test_prose_escapes_what_acts_mid_line_and_web_link_keeps_plain_addresses() -> None:
    assert (
        prose("a *b* [c](d) <img> `e` | @f\n# g")
        == f"a \\*b\\* \\[c\\](d) \\<img\\> \\`e\\` \\| @{ZWJ}f\\x0a\\# g"
    )
    assert prose("cc-by-nc-4.0") == "cc-by-nc-4.0"
    assert web_link("https://example.com/terms.txt") == "https://example.com/terms.txt"
    for bad in ("javascript:alert(1)", "https://x.example/a) [b](c", "http://a b", None):
        assert web_link(bad) is None


def test_a_parent_card_s_license_text_is_escaped_in_the_merge_card() -> None:
    facts = {
        "org/base": RepoFacts("org/base", "a" * 40, license="apache-2.0"),
        "org/a": RepoFacts(
            "org/a",
            "b" * 40,
            license="other",
            license_name="<img src=x> [t](http://e) @bob",
            license_link="javascript:alert(1)",
        ),
    }
    verdict = decide(
        [ParentLicense(f.repo_id, f.license, f.license_name, f.license_link) for f in facts.values()],
        accept_license=True,
    )
    ctx = build_context(
        repo_id="bot/result",
        requester="alice",
        bot_name="bot",
        hub_url="https://hub.example",
        method="linear",
        recipe_yaml="merge_method: linear\nmodels:\n  - model: org/base@a\n  - model: org/a@b\n",
        facts=facts,
        lineage=Lineage(roots=("org/base", "org/a")),
        verdict=verdict,
        job_id="j1",
    )
    text = render_card(ctx)
    assert f"Published under **\\<img src=x\\> \\[t\\](http://e) @{ZWJ}bob (other)**" in text
    assert "(`<img src=x> [t](http://e) @bob`)" in text  # the licence rules' note quotes it as code
    assert "javascript:" not in text and "[terms]" not in text
