"""Where in a YAML document a problem is: ``models[1].parameters.density (line 7)``.

Shared by every file format the engine validates (recipes, search files), so their error
messages name places the same way.
"""

from __future__ import annotations

from typing import Any

import yaml

Path = tuple[Any, ...]


def line_index(node: yaml.Node | None) -> dict[Path, int]:
    """Map each path in the YAML document (keys and list positions) to its 1-based line."""
    index: dict[Path, int] = {}

    def walk(n: yaml.Node, path: Path) -> None:
        index.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode):
                    child = (*path, key.value)
                    index[child] = key.start_mark.line + 1  # a key's own line, not its value's
                    walk(value, child)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, i))

    if node is not None:
        walk(node, ())
    return index


def describe(loc: Path, lines: dict[Path, int]) -> str:
    """A pydantic-style location as text, with the line of its nearest known ancestor."""
    # pydantic adds type tags (e.g. 'function-after[...]') to locations; drop them
    clean = tuple(
        p for p in loc if isinstance(p, int) or not str(p).startswith(("function-", "tuple[", "list["))
    )
    text = ""
    for part in clean:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    line = next((lines[clean[:n]] for n in range(len(clean), 0, -1) if clean[:n] in lines), None)
    if line is not None:
        text = f"{text} (line {line})" if text else f"line {line}"
    return text
