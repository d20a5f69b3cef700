#!/usr/bin/env bash
# Run the suite against the newest versions pyproject.toml allows, in a throw-away environment
# (.venv-latest, rebuilt from nothing each time). Not part of CI's gate: run it before refreshing
# the lock (scripts/lock.sh does), to learn whether a new release of a dependency breaks mergebot.
# Arguments go to pytest. The environment's exact versions are written to .venv-latest/freeze.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-latest
rm -rf "$venv"
export MERGEBOT_VENV="$venv"
MERGEBOT_UNLOCKED=1 bash scripts/bootstrap.sh
# the lock's format: exact pins, mergebot itself left out, torch without its local build label
# (`torch==2.13.0` matches the CPU build `2.13.0+cpu` that bootstrap installs first)
"$venv/bin/python" -m pip freeze --all --exclude-editable \
    | grep -v -i '^mergebot[ =@]' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f > "$venv/freeze.txt"
echo "test-latest: newest allowed versions:" \
    $(grep -iE '^(torch|transformers|huggingface[-_]hub|gradio|numba|numpy|safetensors|optuna|lm[-_]eval|mergekit)==' "$venv/freeze.txt")
status=0
bash scripts/test.sh "$@" || status=$?
if [ "$status" = 0 ]; then
    echo "test-latest: PASSED with the versions in $venv/freeze.txt"
else
    echo "test-latest: FAILED (exit $status) with the versions in $venv/freeze.txt" >&2
fi
exit "$status"
