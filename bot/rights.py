"""Whose rights a request's inputs are read with, and the one judgement of what those rights allow.

A merge, a search or a re-merge reads every input (models, tokenizer sources, evaluation data)
with its requester's rights, never with the bot's:

- **anonymous** (a discussion command, a parent update, a Space visitor who did not sign in): the
  facts are gathered with the bot's token but judged as an anonymous visitor would see them, so
  only public, ungated repos may be used, and the result cannot be private (a private repo in the
  bot's namespace would be readable by the bot's operators and nobody who asked);
- **signed in** (a Space user's own OAuth token): the facts are read with that token, so a repo the
  user cannot see does not exist for the request; the result goes to the user's namespace, and is
  private whenever an input is private.

Gated inputs make the result gated (see :mod:`bot.licenses`), so a gate is never dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import SecretStr

from bot.errors import AccessRefused
from bot.hub import Hub, RepoFacts

SIGN_IN = "sign in on the Space to use repos you can read yourself"


@dataclass(frozen=True)
class Rights:
    """The requester's rights: their own token (signed in), or None for an anonymous visitor's."""

    token: SecretStr | None = None

    @property
    def signed_in(self) -> bool:
        return self.token is not None

    def reader(self, hub: Hub) -> Hub:
        """The Hub client that gathers facts for this requester (the bot's, for an anonymous one)."""
        return hub.as_user(self.token.get_secret_value()) if self.token is not None else hub

    def read_token(self, bot_token: str) -> str:
        """The token tensors are read with: the user's own, or the bot's once every input was judged public."""
        return self.token.get_secret_value() if self.token is not None else bot_token


ANONYMOUS = Rights()


def rights_problems(facts: Iterable[RepoFacts], rights: Rights, *, private: bool) -> list[str]:
    """What the requester's rights do not allow, one line each (empty: allowed).

    Args:
        facts: every input repo, as :meth:`bot.hub.Hub.repo_facts` found it (for a signed-in
            requester, found with their own token).
        rights: whose rights the request has.
        private: whether the result is asked to be private.
    """
    problems: list[str] = []
    listed = list(facts)
    if not rights.signed_in:
        for f in listed:
            if f.private:
                problems.append(f"`{f.repo_id}` is not public; a request without sign-in may use public repos only ({SIGN_IN}).")
            elif f.gated:
                problems.append(f"`{f.repo_id}` is gated; a request without sign-in may use ungated repos only ({SIGN_IN}).")
        if private:
            problems.append(
                "A private result must go to your own namespace, which needs sign-in on the Space; "
                "the bot does not publish private repos in its own namespace."
            )
    elif not private:
        hidden = [f.repo_id for f in listed if f.private]
        if hidden:
            names = ", ".join(f"`{r}`" for r in hidden)
            problems.append(f"{names} {'is' if len(hidden) == 1 else 'are'} private, so the result must be private too.")
    return problems


def check_rights(facts: Iterable[RepoFacts], rights: Rights, *, private: bool) -> None:
    """Raise when :func:`rights_problems` finds any.

    Raises:
        bot.errors.AccessRefused: with every problem, one line each.
    """
    problems = rights_problems(facts, rights, private=private)
    if problems:
        raise AccessRefused(tuple(problems))
