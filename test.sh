#!/usr/bin/env bash
# The tests, exactly as CI runs them (.ci/run calls this): set up .venv when needed (setup.sh), lint, then the test
# suite, all on the CPU (tests that need a GPU are marked `gpu` and skip without one).
# Extra arguments go to pytest, e.g. ./test.sh -x -k records
set -euo pipefail
cd "$(dirname "$0")"
. ./setup.sh
echo "test.sh: ruff check ." >&2
ruff check .
echo "test.sh: python -m pytest -q $*" >&2
exec python -m pytest -q "$@"
