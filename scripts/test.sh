#!/usr/bin/env bash
# The test command: install if needed, then lint, type-check the engine, and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/mypy
# the Space's browser tests need Chromium (they skip without it)
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && apt-get install -y -qq chromium; } \
        || echo "warning: could not install chromium; the browser tests will be skipped" >&2
fi
.venv/bin/python -m pytest "$@"
