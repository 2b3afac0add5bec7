#!/usr/bin/env bash
# Set up and run the whole test suite: install, format check, lint, type check, stub check, tests.
# This is the README's test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${STEER_SKIP_INSTALL:-0}" != "1" ]; then
  # The pinned CPU build of torch first: an unpinned torch would pull several GB of CUDA wheels.
  # On a GPU machine, install your CUDA torch first and set STEER_SKIP_TORCH=1.
  if [ "${STEER_SKIP_TORCH:-0}" != "1" ]; then
    python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  fi
  python -m pip install --quiet --disable-pip-version-check -e ".[offline,dev]"
fi

ruff format --check .
ruff check .
mypy
python scripts/gen_protos.py --check
python scripts/readme_tree.py --check
python -m pytest -q -p no:cacheprovider "$@"
