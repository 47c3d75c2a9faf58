#!/usr/bin/env bash
# The tests, exactly as CI runs them (.ci/run calls this): set up .venv when needed (setup.sh), lint, then the test
# suite, all on the CPU (tests that need a GPU are marked `gpu` and skip without one).
# The tests spread over every core (pytest-xdist: -n logical, tests that share a compiled report kept on one worker).
# Extra arguments go to pytest, e.g. ./test.sh -x -k records, or ./test.sh -n 0 for one process.
#   ./test.sh -m "not cuda_check"      the quick loop: everything but the CUDA compile check (minutes)
#   ./test.sh -m cuda_check            the CUDA compile check alone
set -euo pipefail
cd "$(dirname "$0")"
. ./setup.sh
echo "test.sh: ruff check ." >&2
ruff check .
echo "test.sh: python -m pytest -q -n logical --dist loadgroup $*" >&2
exec python -m pytest -q -n logical --dist loadgroup "$@"
