"""The Space as a repo that builds on Hugging Face Spaces: `mergebot space export` and `push`.

A Space's build runs ``pip install -r requirements.txt`` in an empty folder before the repo is
copied in, so the export carries the project's code itself (never ``-e .``) and a
``requirements.txt`` of mergebot's runtime dependencies pinned to the lock's exact versions.
Its ``README.md`` is ``space/README.md`` (the Space's card) with ``sdk_version`` set to the
lock's gradio; its ``app.py`` starts what ``space/serve.py`` starts.

Nothing from the environment is written: an export that holds a token-like string or the value
of ``HF_TOKEN`` or ``WEBHOOK_SECRET`` is refused and removed.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

from bot.errors import BotError
from bot.hub import Hub

PROJECT = Path(__file__).resolve().parents[1]
# the project's code the Space imports (localhub is only for tests and the offline demo)
CODE = ("engine", "bot", "space", "mergebot")
DATA = ("model_card_templates",)
SKIPPED_DIRS = frozenset(
    {
        "__pycache__",
        ".venv",
        "tests",
        ".cache",
        "demo-data",
        ".git",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
    }
)
SKIPPED_SUFFIXES = frozenset({".pyc", ".pyo", ".sqlite", ".db", ".env", ".log"})
# of space/: the export writes its own at the root
SKIPPED_FILES = frozenset({"requirements.txt", "README.md"})
# the extras whose dependencies the Space needs (the Evolve tab)
EXTRAS = ("evolve",)
GRADIO = "gradio"
APP = '''"""The Space's entry point (Spaces run `python app.py`): the page, the bot's webhook and queue.

Written by `mergebot space export`; the same server as `python space/serve.py`.
"""

import sys

from space.serve import main

if __name__ == "__main__":
    sys.exit(main())
'''
_TOKEN = re.compile(rb"\bhf_[A-Za-z0-9]{30,}")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?")


class DeployError(BotError):
    """The Space cannot be exported or pushed as asked (the message says why and what to do)."""


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """The lock's exact versions, by normalized project name.

    Raises:
        DeployError: the file cannot be read, or a line is not ``name==version``.
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DeployError(f"Cannot read the lock {path}: {exc.strerror}.") from None
    versions: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip() or not _NAME.fullmatch(name.strip()):
            raise DeployError(f"{path}:{number}: expected `name==version`, found `{raw.strip()}`.")
        versions[_normalized(name)] = version.strip()
    return versions


def runtime_requirements(project: Path = PROJECT) -> list[str]:
    """mergebot's runtime requirements (its dependencies and the Space's extras), as declared.

    Read from the project's ``pyproject.toml``, else from the installed package's metadata.
    """
    pyproject = project / "pyproject.toml"
    if pyproject.is_file():
        meta = tomllib.loads(pyproject.read_text())["project"]
        declared = list(meta.get("dependencies", []))
        for extra in EXTRAS:
            declared += meta.get("optional-dependencies", {}).get(extra, [])
        return declared
    listed = importlib.metadata.requires("mergebot") or []
    return [r for r in listed if "extra ==" not in r or any(f'extra == "{e}"' in r for e in EXTRAS)]


def closure(requirements: Iterable[str]) -> list[str]:
    """The requirements and, transitively, what their installed distributions require.

    Markers are evaluated for this machine (a Space is Linux, at the lock's Python); a project
    that is not installed here ends its branch (pip resolves what it needs on the Space).

    Returns:
        The requirements as given, then each further project once, by name.
    """
    from packaging.requirements import Requirement

    given = [Requirement(r) for r in requirements]
    wanted = [r for r in given if r.marker is None or r.marker.evaluate()]
    seen = {_normalized(r.name) for r in wanted}
    found: dict[str, str] = {}
    todo = [(r.name, frozenset(r.extras)) for r in wanted]
    while todo:
        name, extras = todo.pop()
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            environments = [{"extra": e} for e in extras] or [{"extra": ""}]
            if requirement.marker is not None and not any(
                requirement.marker.evaluate(e) for e in environments
            ):
                continue
            key = _normalized(requirement.name)
            if key not in seen:
                seen.add(key)
                found[key] = requirement.name
                todo.append((requirement.name, frozenset(requirement.extras)))
    return [str(r) for r in given] + [found[k] for k in sorted(found)]


def pinned(requirements: Iterable[str], versions: Mapping[str, str] | None) -> list[str]:
    """Each requirement as ``name[extras]==version``, one line per project, in the order given.

    Args:
        requirements: PEP 508 strings; markers are dropped (a Space is Linux, at the lock's Python).
        versions: the lock's versions by normalized name; None: the installed versions.

    Raises:
        DeployError: a requirement has no locked (or installed) version.
    """
    out: dict[str, str] = {}
    for requirement in requirements:
        match = _NAME.match(requirement.split(";", 1)[0])
        if match is None:
            raise DeployError(f"Cannot read the requirement `{requirement}`.")
        name, extras = match.group(1), match.group(2) or ""
        key = _normalized(name)
        if key in out:
            continue
        if versions is not None:
            version = versions.get(key)
        else:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = None
        if version is None:
            where = "in the lock" if versions is not None else "installed"
            raise DeployError(f"`{name}` has no version {where}; re-run scripts/lock.sh, or pass --lock.")
        # a local build (torch's +cpu) is pinned by its public version: the Space gets its own build
        out[key] = f"{name}{extras}=={version.split('+', 1)[0]}"
    return list(out.values())


def space_card(card: str, gradio_version: str) -> str:
    """``space/README.md`` with its front matter's ``sdk_version`` set to ``gradio_version``.

    Raises:
        DeployError: the card has no YAML front matter.
    """
    parts = card.split("---\n", 2)
    if len(parts) != 3 or parts[0].strip():
        raise DeployError(
            "space/README.md must start with the Space's YAML front matter between `---` lines."
        )
    meta = yaml.safe_load(parts[1]) or {}
    meta["sdk_version"] = gradio_version
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + parts[2]


def _copy_tree(source: Path, target: Path, skipped_files: frozenset[str] = frozenset()) -> None:
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part in SKIPPED_DIRS for part in relative.parts) or path.is_dir():
            continue
        if path.suffix in SKIPPED_SUFFIXES or path.is_symlink():
            continue
        if len(relative.parts) == 1 and relative.name in skipped_files:
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / relative)


def _refuse_secrets(folder: Path, secrets: Sequence[str]) -> None:
    # a value this short would be found in any file: it is no secret worth the name
    needles = [s.encode() for s in secrets if len(s) >= 8]
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if any(n in data for n in needles) or _TOKEN.search(data):
            shutil.rmtree(folder)
            raise DeployError(
                f"`{path.relative_to(folder)}` holds a token or a secret; nothing was exported. "
                "Remove it from the project (secrets belong in the Space's settings)."
            )


def export_space(
    out: Path,
    *,
    project: Path = PROJECT,
    lock: Path | None = None,
    secrets: Sequence[str] = (),
) -> Path:
    """Write the Space repo into ``out`` (a new or empty folder).

    Args:
        project: the checkout to export (its ``space/README.md``, code and ``pyproject.toml``).
        lock: the exact versions to pin (default: ``project/requirements.lock`` if present, else
            the installed versions).
        secrets: values that must not appear in the export (the environment's token and secret).

    Returns:
        ``out``.

    Raises:
        DeployError: ``project`` is not a checkout, ``out`` is not empty, a dependency has no
            pinned version, or the export would hold a secret.
    """
    absent = [name for name in (*CODE, *DATA, "space/README.md") if not (project / name).exists()]
    if absent:
        raise DeployError(f"{project} is not a mergebot checkout (no {', '.join(absent)}); export from one.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeployError(f"{out} is not an empty folder; choose a new one.")
    lock = lock if lock is not None else (project / "requirements.lock")
    versions = read_lock(lock) if lock.is_file() else None
    requirements = pinned(closure(runtime_requirements(project)), versions)
    gradio = next((r for r in requirements if _normalized(r.split("[")[0].split("=")[0]) == GRADIO), None)
    if gradio is None:
        raise DeployError("mergebot's dependencies do not name gradio; the Space cannot be built.")
    card = space_card((project / "space" / "README.md").read_text(), gradio.rsplit("==", 1)[1])
    out.mkdir(parents=True, exist_ok=True)
    for package in CODE:
        _copy_tree(project / package, out / package, SKIPPED_FILES if package == "space" else frozenset())
    for folder in DATA:
        _copy_tree(project / folder, out / folder)
    source = f"`{lock.name}`" if versions is not None else "the installed versions"
    header = (
        f"# Written by `mergebot space export` from {source}: mergebot's runtime dependencies\n"
        "# and, pinned too, what they depend on (so the Space builds as it was tested).\n"
    )
    (out / "requirements.txt").write_text(header + "\n".join(requirements) + "\n")
    (out / "README.md").write_text(card)
    (out / "app.py").write_text(APP)
    _refuse_secrets(out, secrets)
    return out


def push_space(
    hub: Hub,
    repo_id: str,
    folder: Path,
    *,
    secrets: Mapping[str, str],
    variables: Mapping[str, str] | None = None,
    hardware: str | None = None,
) -> str:
    """Create (or update) the Space ``repo_id`` from an exported ``folder`` and set its secrets.

    Args:
        secrets: the Space's secrets by name (e.g. HF_TOKEN, WEBHOOK_SECRET); values are never logged.
        variables: the Space's (visible) variables by name (e.g. MERGEBOT_NAMESPACE).
        hardware: a flavor to request (``t4-small``...), or None to leave the Space's as it is.

    Returns:
        The commit's id.

    Raises:
        bot.errors.HubError: the Hub refused (no rights to the namespace, unknown flavor...).
    """
    hub.ensure_repo(repo_id, repo_type="space", space_sdk="gradio")
    for key, value in secrets.items():
        hub.add_space_secret(repo_id, key, value)
    for key, value in (variables or {}).items():
        hub.add_space_variable(repo_id, key, value)
    commit = hub.upload_space(repo_id, folder, "mergebot space push")
    if hardware is not None:
        hub.request_space_hardware(repo_id, hardware)
    return commit
