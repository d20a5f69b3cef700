#!/usr/bin/env bash
# Create the virtual environment and install mergebot with its test and quality extras, at exactly
# the versions in requirements.lock (the set the suite was last run with).
#
#   MERGEBOT_VENV      where the environment goes (default .venv)
#   MERGEBOT_UNLOCKED  1: ignore the lock and install the newest versions pyproject.toml allows
#                      (scripts/test-latest.sh and scripts/lock.sh use this; CI never does)
#
# torch goes first, at the lock's version: on this project's machines that is the CPU build, and
# installing it before anything else keeps a CUDA build from being pulled in. The packaging tools
# are pinned too, and mergebot itself is installed without build isolation, so no step fetches
# whatever is newest. An environment already built from the same lock and pyproject is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MERGEBOT_VENV:-.venv}"
lock=requirements.lock
unlocked="${MERGEBOT_UNLOCKED:-0}"
pin() { grep -E "^$1==" "$lock" || { echo "bootstrap: $lock has no pin for $1" >&2; exit 1; }; }

stamp="$venv/.mergebot-installed"
if [ "$unlocked" = 1 ]; then
    want="unlocked"
else
    want="$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        exit 0
    fi
fi
rm -f "$stamp"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pipq() { "$py" -m pip install --quiet --disable-pip-version-check "$@"; }

if [ "$unlocked" = 1 ]; then
    pipq --upgrade pip setuptools wheel
    pipq "$(pin torch)"
    pipq -e ".[test,quality]"
else
    pipq "$(pin pip)" "$(pin setuptools)" "$(pin wheel)"
    pipq "$(pin torch)"
    pipq --no-deps -r "$lock"
    pipq --no-deps --no-build-isolation -e .
    # every requirement of every installed package is met by the lock's versions: a dependency added
    # to pyproject.toml but not to the lock fails here, instead of being fetched at its newest
    "$py" -m pip check
    "$py" - <<'PY'
# pip check reads only the base requirements; the extras this environment is for must be met too
import sys
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement

missing = []
for line in requires("mergebot") or []:
    req = Requirement(line)
    extras = {"test", "quality"}
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
        continue
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            missing.append(f"{req} (locked: {version(req.name)})")
    except PackageNotFoundError:
        missing.append(f"{req} (not in the lock)")
if missing:
    sys.exit("bootstrap: requirements.lock does not meet pyproject.toml: " + "; ".join(missing)
             + "\nrefresh it with: bash scripts/lock.sh")
PY
fi
echo "$want" > "$stamp"
