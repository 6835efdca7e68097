#!/usr/bin/env bash
# The main job: set up (if needed), then train/evaluate every method on the bundled digits data.
# Arguments go to scripts/demo.py (e.g. --quick, --device cuda, --seeds 0 1 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python scripts/demo.py "$@"
