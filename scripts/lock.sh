#!/usr/bin/env bash
# Refresh requirements.lock: build an environment with the newest versions pyproject.toml allows,
# run the whole suite in it (scripts/test-latest.sh), and only if it passes write those exact
# versions to requirements.lock. Review and commit the lock's diff afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-latest.sh "$@"
{
    echo "# Exact versions the suite passed with: installed by scripts/bootstrap.sh (torch first)."
    echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d) with Python $(.venv-latest/bin/python -c 'import platform; print(platform.python_version())'); do not edit by hand."
    cat .venv-latest/freeze.txt
} > requirements.lock
echo "lock: requirements.lock refreshed; review 'git diff requirements.lock' and commit it"
