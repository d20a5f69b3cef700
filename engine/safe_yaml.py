"""Bounded YAML for files that may come from strangers: recipes and search files.

PyYAML's safe loader runs no code, but it still expands aliases (a few hundred bytes of
nested ``*name`` references build gigabytes), recurses once per nesting level, and reads
``.nan`` and ``.inf`` as numbers. :func:`parse_bounded` refuses each of these while the
document is composed, before anything is expanded or built:

- text longer than :data:`MAX_BYTES`;
- any anchor or alias (``&name``, ``*name``): a recipe never needs one;
- nesting deeper than :data:`MAX_DEPTH`, or more than :data:`MAX_NODES` values;
- a number that is not finite, or an integer that does not fit in 64 bits.

:func:`list_problems` bounds the lists a recipe or search file may hold (models, slices).
The same limits apply to every entry point (command line, discussion, Space): one parser.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from engine.yaml_locations import describe

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_MODELS = 64
MAX_SLICES = 256
INT_LIMIT = 2**63  # integers must fit in 64 bits (a seed, a layer index), so floats of them are finite
_MAX_INT_CHARS = 80  # longer integer text is refused before it is converted (int() is quadratic)

_FLOAT_TAG = "tag:yaml.org,2002:float"
_INT_TAG = "tag:yaml.org,2002:int"

Location = tuple[Any, ...]


@dataclass(frozen=True)
class YamlProblem:
    """One reason a document was refused: where (``line 3, column 5`` or a path) and why."""

    location: str
    message: str


class YamlRefused(Exception):
    """The text is not YAML, or breaks a bound; callers turn it into their own error type."""

    def __init__(self, problems: list[YamlProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{p.location}: {p.message}" for p in self.problems))


def _at(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _refuse(mark: yaml.Mark | None, message: str) -> YamlRefused:
    return YamlRefused([YamlProblem(_at(mark), message)])


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader that refuses anchors, aliases and deep or huge documents while composing."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _refuse(
                event.start_mark,
                "YAML anchors and aliases (`&name`, `*name`) are not accepted; write each value out",
            )
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _refuse(event.start_mark, f"the document holds more than {MAX_NODES} values")
        if self._depth >= MAX_DEPTH:
            raise _refuse(event.start_mark, f"the document is nested more than {MAX_DEPTH} levels deep")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_bounded(path: str | os.PathLike[str]) -> str:
    """A file's text, reading at most one byte more than :data:`MAX_BYTES` (the rest is refused anyway).

    Raises:
        OSError: the file cannot be read.
        YamlRefused: it is not UTF-8 text.
    """
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:  # cut mid-character perhaps; parse_bounded refuses it by size
        return raw.decode("utf-8", errors="replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlRefused([YamlProblem("", f"not UTF-8 text (byte {exc.start})")]) from None


def parse_bounded(text: str) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML document within the bounds above.

    Returns:
        The data (None for an empty document) and its node tree (for line numbers).

    Raises:
        YamlRefused: not valid YAML, or a bound is broken; nothing was expanded.
    """
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_BYTES:
        raise YamlRefused(
            [YamlProblem("", f"the text is larger than {MAX_BYTES // 1024} KiB, the most accepted")]
        )
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses unprintable characters here
        node = loader.get_single_node()
        if node is None:
            return None, None
        problems = _number_problems(loader, node)
        if problems:
            raise YamlRefused(problems)
        return loader.construct_document(node), node
    except yaml.reader.ReaderError as exc:
        raise YamlRefused(
            [YamlProblem("", f"not valid YAML: character #x{exc.character:04x} at position {exc.position}")]
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise _refuse(mark, f"not valid YAML: {problem}") from None
    except (ValueError, OverflowError) as exc:  # a scalar PyYAML resolves but cannot build (a date)
        raise YamlRefused([YamlProblem("", f"not valid YAML: {exc}")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _number_problems(loader: _BoundedLoader, root: yaml.Node) -> list[YamlProblem]:
    """Every float that is not finite and every integer beyond 64 bits, with its path and line."""
    problems: list[YamlProblem] = []

    def where(path: Location, node: yaml.Node) -> str:
        return describe(path, {path: node.start_mark.line + 1})

    def walk(node: yaml.Node, path: Location) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(key, path)
                walk(value, (*path, key.value) if isinstance(key, yaml.ScalarNode) else path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))
        elif isinstance(node, yaml.ScalarNode) and node.tag == _FLOAT_TAG:
            if not math.isfinite(loader.construct_yaml_float(node)):
                problems.append(YamlProblem(where(path, node), f"`{node.value}` is not a finite number"))
        elif isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG:
            too_long = len(node.value) > _MAX_INT_CHARS
            if too_long or abs(loader.construct_yaml_int(node)) >= INT_LIMIT:
                shown = node.value if len(node.value) <= 24 else node.value[:20] + "..."
                problems.append(YamlProblem(where(path, node), f"`{shown}` is too large a number"))

    walk(root, ())
    return problems


def list_problems(data: Mapping[Any, Any]) -> list[tuple[Location, str]]:
    """Lists above their bounds: ``models`` (:data:`MAX_MODELS`), ``slices`` and each slice's ``sources``.

    Returns:
        (location, message) pairs, empty when every list is within its bound.
    """
    problems: list[tuple[Location, str]] = []

    def check(value: Any, loc: Location, limit: int, what: str) -> None:
        if isinstance(value, list) and len(value) > limit:
            problems.append((loc, f"at most {limit} {what} are accepted, got {len(value)}"))

    check(data.get("models"), ("models",), MAX_MODELS, "models")
    slices = data.get("slices")
    check(slices, ("slices",), MAX_SLICES, "slices")
    if isinstance(slices, list):
        for i, item in enumerate(slices[:MAX_SLICES]):
            if isinstance(item, dict):
                check(item.get("sources"), ("slices", i, "sources"), MAX_MODELS, "sources")
    return problems
