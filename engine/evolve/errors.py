"""Errors a user of ``mergebot evolve`` can fix, as one tree under the engine's :class:`MergeError`.

    MergeError                      (engine.errors) a message written for the person who ran it
    ├── SearchFileError             the search file is malformed or asks for something impossible
    └── EvaluationDataError         the evaluation data file is missing, malformed or too small

Each error builds its own message from its fields, so the CLI prints ``str(error)`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import MergeError


@dataclass(frozen=True)
class SearchProblem:
    """One thing wrong in a search file, at a location such as ``parameters.density.min``."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class SearchFileError(MergeError):
    """The search file is invalid; every problem found is reported together."""

    def __init__(self, problems: Sequence[SearchProblem], source: str | None = None) -> None:
        self.problems = tuple(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"Invalid search file{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"Invalid search file{where} ({len(self.problems)} problems):\n{lines}"
        super().__init__(text)

    @classmethod
    def single(cls, location: str, message: str, source: str | None = None) -> SearchFileError:
        return cls([SearchProblem(location, message)], source=source)


class EvaluationDataError(MergeError):
    """The evaluation data cannot be used: which file, where in it, and what to change."""

    def __init__(self, path: str, reason: str, line: int | None = None) -> None:
        self.path = path
        self.reason = reason
        self.line = line
        at = f" (line {line})" if line is not None else ""
        super().__init__(f"Evaluation data {path}{at}: {reason}")
