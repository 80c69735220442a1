#!/usr/bin/env bash
# Record the exact versions installed in .venv as requirements.lock, the file scripts/setup.sh
# installs from. Run it only after the test suite passed on those versions, typically:
#   bash scripts/setup.sh --browser --latest && .venv/bin/python -m pytest -q -rs && bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "lock: no .venv; run scripts/setup.sh first" >&2; exit 2; }
{
  echo "# The exact versions the test suite passed on; scripts/setup.sh installs these (--no-deps)."
  echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $(.venv/bin/python --version 2>&1)."
  echo "# torch is the CPU build (2.13.0+cpu on the build machine); '==2.13.0' also admits that local label."
  # The project itself is installed editable by setup.sh, so it is not pinned here.
  .venv/bin/python -m pip freeze --exclude-editable --all \
    | grep -v -E '^pip==' \
    | sed -E 's/^(torch==[0-9.]+)\+cpu$/\1/' \
    | LC_ALL=C sort -f
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "lock: wrote requirements.lock ($(grep -c -v '^#' requirements.lock) packages)"
