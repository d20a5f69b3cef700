"""Errors a user can cause, as one tree. Anything else escaping the engine is a bug.

    MergeError                      base: a message written for the person who ran the merge
    ├── RecipeError                 the YAML recipe is malformed or asks for something impossible
    ├── ModelNotFoundError          a model reference names nothing we can read
    ├── UnsafeWeightsError          only pickled weights are available and pickle was not allowed
    ├── SafetensorsFormatError      a weights file is corrupt or hostile
    ├── IncompatibleModelsError     models disagree (architecture, tensor names, shapes, layers)
    ├── OutputError                 the output folder cannot be written
    └── VerificationError           the merged output is not the model the plan promised (not published)

Each error carries the fields it is about and builds its own message, so every edge
(CLI, discussion reply, Space) can show ``str(error)`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class MergeError(Exception):
    """Base of every error a user can fix; ``str()`` is the whole message."""


@dataclass(frozen=True)
class RecipeProblem:
    """One thing wrong in a recipe, at a location such as ``models[1].parameters.density``."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class RecipeError(MergeError):
    """The recipe is invalid; all problems found are reported together.

    ``notes`` are what the recipe sets to no effect (an ignored key, a parameter the method
    does not take); they follow the problems, since a misspelt key is often their cause.
    """

    def __init__(
        self, problems: Sequence[RecipeProblem], source: str | None = None, *, notes: Sequence[str] = ()
    ) -> None:
        self.problems = tuple(problems)
        self.source = source
        self.notes = tuple(notes)
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"Invalid recipe{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"Invalid recipe{where} ({len(self.problems)} problems):\n{lines}"
        text += "".join(f"\nnote: {note}" for note in self.notes)
        super().__init__(text)

    @classmethod
    def single(cls, location: str, message: str, source: str | None = None) -> RecipeError:
        return cls([RecipeProblem(location, message)], source=source)


class ModelNotFoundError(MergeError):
    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"Model '{model}' could not be read: {reason}")


class UnsafeWeightsError(MergeError):
    def __init__(self, model: str, files: Sequence[str]) -> None:
        self.model = model
        self.files = tuple(files)
        shown = ", ".join(self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        super().__init__(
            f"Model '{model}' only has pickled weights ({shown}). Pickle files can run arbitrary code "
            "when loaded, so they are refused. Convert the model to safetensors, or pass --allow-pickle "
            "if you trust its author."
        )


class SafetensorsFormatError(MergeError):
    def __init__(self, path: str, reason: str, tensor: str | None = None) -> None:
        self.path = path
        self.reason = reason
        self.tensor = tensor
        about = f" (tensor '{tensor}')" if tensor else ""
        super().__init__(f"Invalid safetensors file {path}{about}: {reason}")


class IncompatibleModelsError(MergeError):
    def __init__(self, message: str, models: Sequence[str] = (), field: str | None = None) -> None:
        self.models = tuple(models)
        self.field = field
        super().__init__(message)


class OutputError(MergeError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"Cannot write the output to {path}: {reason}")


class VerificationError(MergeError):
    """The output failed verification: tensors missing or unexpected, or a config transformers rejects."""

    def __init__(self, problems: Sequence[str], shown: int = 5) -> None:
        self.problems = tuple(problems)
        listed = "; ".join(self.problems[:shown])
        more = f" (and {len(self.problems) - shown} more)" if len(self.problems) > shown else ""
        super().__init__(
            f"The merged model failed verification, so it was not written or published: {listed}{more}. "
            "This is a bug in mergebot for these models: please report it with the recipe."
        )
