#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q "$@"
