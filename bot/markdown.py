"""Markdown for text a stranger wrote, echoed in the bot's comments and cards.

Whatever the text holds (backticks, a fence, a heading, an ``@name``), what it becomes here
renders as that text and nothing more: it cannot close the bot's code, start the bot's own
headings or links, or notify someone.

- :func:`code_span`: inline code on one line, delimited by more backticks than the text holds.
- :func:`code_block`: a fenced block whose fence is longer than any backtick run inside.
- :func:`prose`: text with markdown punctuation escaped, for a name shown outside code.
- :func:`quiet_mentions`: ``@name`` made inert (a zero-width joiner after the ``@``), except
  the names kept (the requester, whom the bot does mean to address).
- :func:`web_link`: an address a stranger gave, kept only if it is a plain ``http(s)`` link.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["code_block", "code_span", "prose", "quiet_mentions", "web_link"]

ZWJ = "\u200d"
SPAN_LIMIT = 200  # characters of a stranger's text shown inline; the rest is cut with "…"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MENTION = re.compile(r"(?<![\w@/.\-])@(?=[A-Za-z0-9])([A-Za-z0-9][\w.\-]*)")
_PROSE_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")
_WEB_LINK = re.compile(r"^https?://[^\s()<>\[\]`\"']+$")


def _longest_run(text: str, char: str) -> int:
    return max((len(m) for m in re.findall(f"{re.escape(char)}+", text)), default=0)


def _one_line(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def code_span(text: str) -> str:
    """``text`` as inline code: control characters (newlines) shown escaped, at most 200 characters.

    The delimiter is one backtick longer than the longest run inside, and padded with spaces
    when the text starts or ends with a backtick, as CommonMark requires.
    """
    shown = _one_line(text)
    if len(shown) > SPAN_LIMIT:
        shown = shown[:SPAN_LIMIT] + "…"
    ticks = "`" * (_longest_run(shown, "`") + 1)
    pad = " " if shown.startswith("`") or shown.endswith("`") or not shown.strip() else ""
    return f"{ticks}{pad}{shown}{pad}{ticks}"


def code_block(text: str, info: str = "") -> str:
    """``text`` in a fenced block that no line of it can close (the fence outgrows every backtick run)."""
    fence = "`" * max(3, _longest_run(text, "`") + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{fence}{info}\n{body}{fence}"


def prose(text: str) -> str:
    """``text`` on one line, markdown punctuation backslash-escaped and mentions inert, shown as prose.

    The text is one line inside the bot's own, so only what acts mid-line is escaped (emphasis,
    code, links, HTML, tables); ``-`` and ``.`` stay as they are.
    """
    return quiet_mentions(_one_line(_PROSE_SPECIAL.sub(r"\\\1", text)))


def web_link(text: str | None) -> str | None:
    """``text`` when it is a plain ``http(s)`` address a markdown link can hold, else None."""
    return text if text is not None and _WEB_LINK.match(text) else None


def quiet_mentions(text: str, keep: Iterable[str] = ()) -> str:
    """Every ``@name`` in ``text`` made inert, except the names in ``keep`` (case-insensitive).

    ``org/name@revision`` and ``a@b`` are not mentions and stay as they are.
    """
    kept = {name.lower() for name in keep if name}

    def inert(match: re.Match[str]) -> str:
        name = match.group(1)
        return match.group(0) if name.lower() in kept else f"@{ZWJ}{name}"

    return _MENTION.sub(inert, text)
