#!/usr/bin/env bash
# Create .venv and install mergebot with its test extra. torch goes first, pinned to the
# CPU build this project is developed against, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
