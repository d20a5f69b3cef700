#!/usr/bin/env bash
# The test command: install from the lock if needed, then lint, type-check and run the suite.
# Arguments go to pytest. MERGEBOT_VENV names another environment (scripts/test-latest.sh uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
venv="${MERGEBOT_VENV:-.venv}"
export HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
"$venv/bin/ruff" check .
"$venv/bin/mypy"
# the Space's browser tests need Chromium (they skip without it)
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
    apt_log="$(mktemp)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >"$apt_log" 2>&1; then
        tail -n 20 "$apt_log" >&2
        echo "warning: could not install chromium; the browser tests will be skipped" >&2
    fi
    rm -f "$apt_log"
fi
"$venv/bin/python" -m pytest "$@"
