"""Discussion text -> a command for the bot. Pure: no I/O, never raises.

A comment is addressed to the bot when a line starts with ``@<botname>``; the rest of that
line is the command. A merge takes its recipe from the first fenced ``yaml`` block after it::

    @mergebot merge --name my-merge [--private] [--accept-license] [--force]
    ```yaml
    merge_method: slerp
    ...
    ```

``evolve`` takes the same flags and a search file (``mergebot evolve``'s format) in the block;
its models are Hub repos and its ``evaluation.data`` a file in a Hub repo (see :func:`usage`).

Anything addressed to the bot that it does not understand becomes :class:`Invalid`, which
the bot answers with the usage text; comments not addressed to it, and its own, give None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.markdown import code_span

NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
JOB_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_FENCE_RE = re.compile(
    r"^[ \t]*```[ \t]*(?:ya?ml)?[ \t]*\r?\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE | re.IGNORECASE
)


@dataclass(frozen=True)
class Merge:
    """Merge a recipe; ``force`` publishes the result even if it fails its quality check."""

    name: str
    recipe: str
    private: bool = False
    accept_license: bool = False
    force: bool = False


@dataclass(frozen=True)
class Evolve:
    """Search a merge's coefficients (CMA-ES) and publish the best merge; ``search`` is the search file."""

    name: str
    search: str
    private: bool = False
    accept_license: bool = False


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class Cancel:
    job_id: str | None = None


@dataclass(frozen=True)
class Help:
    pass


@dataclass(frozen=True)
class Remerge:
    pass


@dataclass(frozen=True)
class Invalid:
    """Addressed to the bot but not understood; ``problem`` says why."""

    problem: str


Command = Merge | Evolve | Status | Cancel | Help | Remerge | Invalid


def usage(bot_name: str) -> str:
    """The help text, with a complete example."""
    return (
        f"Here is what I understand (one command per comment, starting a line with `@{bot_name}`):\n\n"
        f"- `@{bot_name} merge --name NAME [--private] [--accept-license] [--force]` followed by a fenced "
        "```` ```yaml ```` block holding a mergekit recipe; models are Hub ids (`org/name` or `org/name@revision`). "
        "A merge that fails its quality check (perplexity far above its best parent's, or degenerate "
        "generations) is published only with `--force`.\n"
        f"- `@{bot_name} evolve --name NAME [--private] [--accept-license]` followed by a fenced "
        "```` ```yaml ```` search file (the format of `mergebot evolve`): I search the merge's coefficients "
        "with CMA-ES and publish the best merge with its search history. Its models are Hub ids; its "
        "`evaluation.data` is a file in a Hub repo, written `hf://datasets/org/name/path.jsonl` "
        "(a dataset), `hf://org/name/path.txt` (a model repo), with an optional `@revision` after the name.\n"
        f"- `@{bot_name} status`: your jobs and their place in the queue.\n"
        f"- `@{bot_name} cancel [JOB]`: cancel a job (the latest of yours in this discussion if no id).\n"
        f"- `@{bot_name} remerge`: on a repo I made, merge again from the parents' latest revisions.\n"
        f"- `@{bot_name} help`: this message.\n\n"
        "For example:\n\n"
        f"````\n@{bot_name} merge --name my-slerp\n```yaml\nmerge_method: slerp\nbase_model: org/base-model\n"
        "models:\n  - model: org/base-model\n  - model: org/fine-tune\nparameters:\n  t: 0.5\n```\n````"
    )


def _command_line(text: str, bot_name: str) -> tuple[str, str] | None:
    """(the rest of the line after the mention, the text after that line), or None."""
    mention = re.compile(rf"^[ \t>]*@{re.escape(bot_name)}(?![\w-])(.*)$", re.MULTILINE | re.IGNORECASE)
    match = mention.search(text)
    if match is None:
        return None
    return match.group(1).strip(), text[match.end() :]


def parse(text: str, bot_name: str, author: str | None = None) -> Command | None:
    """Read one comment.

    Args:
        text: the comment's raw markdown.
        bot_name: the bot's account name (without ``@``).
        author: the comment's author; the bot's own comments are never commands.

    Returns:
        The command, :class:`Invalid` for text addressed to the bot that is not one, or None.
    """
    if not bot_name or (author is not None and author.lower() == bot_name.lower()):
        return None
    found = _command_line(text, bot_name)
    if found is None:
        return None
    line, after = found
    words = line.split()
    if not words:
        return Invalid("the mention has no command after it.")
    verb, args = words[0].lower(), words[1:]
    if verb in ("merge", "evolve"):
        return _merge(args, after, verb)
    if verb in ("status", "help", "remerge"):
        if args:
            return Invalid(f"`{verb}` takes no arguments (got {code_span(' '.join(args))}).")
        table: dict[str, Command] = {"status": Status(), "help": Help(), "remerge": Remerge()}
        return table[verb]
    if verb == "cancel":
        if len(args) > 1:
            return Invalid("`cancel` takes at most one job id.")
        if args and not JOB_RE.match(args[0]):
            return Invalid(f"{code_span(args[0])} is not a job id.")
        return Cancel(args[0] if args else None)
    return Invalid(f"{code_span(verb)} is not a command I know.")


def _merge(args: list[str], after: str, verb: str = "merge") -> Command:
    """``merge`` and ``evolve``: the same flags, and a YAML block (a recipe, or a search file)."""
    name: str | None = None
    private = accept = force = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--private":
            private = True
        elif arg == "--accept-license":
            accept = True
        elif arg == "--force" and verb == "merge":
            force = True
        elif arg == "--name" or arg.startswith("--name="):
            if arg == "--name":
                if i + 1 >= len(args):
                    return Invalid("`--name` needs a value, e.g. `--name my-merge`.")
                i += 1
                value = args[i]
            else:
                value = arg.partition("=")[2]
            if name is not None:
                return Invalid("`--name` is given twice.")
            name = value
        else:
            takes = (
                "--name, --private, --accept-license and --force"
                if verb == "merge"
                else ("--name, --private and --accept-license")
            )
            return Invalid(f"`{verb}` does not take {code_span(arg)}; it takes {takes}.")
        i += 1
    if name is None:
        return Invalid(f"`{verb}` needs `--name NAME`, the name of the new repo.")
    if not NAME_RE.match(name) or ".." in name or "--" in name:
        return Invalid(
            f"{code_span(name)} is not a valid repo name: use letters, digits, `-`, `_` and `.` (at most 96 characters)."
        )
    fence = _FENCE_RE.search(after)
    what = "the recipe" if verb == "merge" else "the search file"
    if fence is None:
        return Invalid(f"`{verb}` needs {what} in a fenced ```` ```yaml ```` block after the command line.")
    recipe = fence.group(1)
    if not recipe.strip():
        return Invalid("the ```` ```yaml ```` block is empty.")
    if verb == "evolve":
        return Evolve(name=name, search=recipe, private=private, accept_license=accept)
    return Merge(name=name, recipe=recipe, private=private, accept_license=accept, force=force)


def render(command: Command, bot_name: str) -> str:
    """The comment text that :func:`parse` reads back as ``command`` (not for :class:`Invalid`)."""
    if isinstance(command, Merge | Evolve):
        force = isinstance(command, Merge) and command.force
        flags = "".join(
            f
            for f, on in (
                (" --private", command.private),
                (" --accept-license", command.accept_license),
                (" --force", force),
            )
            if on
        )
        verb, body = ("merge", command.recipe) if isinstance(command, Merge) else ("evolve", command.search)
        body = body if body.endswith("\n") else body + "\n"
        return f"@{bot_name} {verb} --name {command.name}{flags}\n```yaml\n{body}```\n"
    if isinstance(command, Cancel):
        return f"@{bot_name} cancel" + (f" {command.job_id}" if command.job_id else "")
    if isinstance(command, Status | Help | Remerge):
        return f"@{bot_name} {type(command).__name__.lower()}"
    raise ValueError("Invalid commands have no text form")
