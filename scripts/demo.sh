#!/usr/bin/env bash
# The main job: install, build small demo models on the spot, audit and merge them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/mergebot demo "$@"
