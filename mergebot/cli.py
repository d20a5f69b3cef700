"""`mergebot <command> ...`: dispatch to the package that owns the command.

Each command lives in its own package's ``cli`` module and is imported only when it
is used, so `mergebot merge` never pays for importing the Hub server or the UI.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from collections.abc import Sequence

# command -> (module with a ``main(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("engine.cli", "merge models from a mergekit YAML recipe into a folder"),
    "check": ("engine.cli", "audit a recipe's models for compatibility, reading no weights"),
    "extract-lora": ("engine.cli", "extract a PEFT LoRA adapter from a fine-tune and its base"),
    "demo": ("mergebot.demo", "start localhub with demo models, the bot and the Space, offline"),
    "bot": ("bot.cli", "run the merge bot: webhook listener, job queue and worker"),
    "space": ("space.cli", "deploy the Space: export its repo, or push it to the Hub"),
    "hub": ("localhub.cli", "run and administer localhub, a Hub-compatible server for offline use"),
    "evolve": ("engine.evolve.cli", "search merge coefficients with CMA-ES"),
}


ENGINE_COMMANDS = frozenset({"merge", "check", "extract-lora"})


def _prepare_process(command: str) -> None:
    """Settings for a command-line process, made before numpy and torch load.

    The garbage collector is off while the command's modules import (torch alone makes
    hundreds of thousands of objects, and each full collection walks them all), and those
    objects are then frozen out of later collections. A merge runs its own one worker per
    core; OpenBLAS's idle helper threads would only spin on the same cores (the user's
    ``OPENBLAS_NUM_THREADS`` wins).
    """
    gc.disable()
    if command in ENGINE_COMMANDS:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _imported() -> None:
    gc.freeze()
    gc.enable()


def _usage() -> str:
    lines = ["usage: mergebot <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `mergebot <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from mergebot import __version__

        print(f"mergebot {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        print(f"mergebot: unknown command `{command}`.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[command]
    _prepare_process(command)
    try:
        module = importlib.import_module(module_name)
    finally:
        _imported()
    result: int = module.main([command, *rest]) if module_name == "engine.cli" else module.main(rest)
    return result
