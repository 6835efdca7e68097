#!/usr/bin/env bash
# The main job: set up (if needed), then train/evaluate every method on the bundled digits data.
# Arguments go to scripts/demo.py (e.g. --quick, --device cuda, --seeds 0 1 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# each run sets its own thread count (demo.py --threads, default 1), so no OMP_NUM_THREADS here
exec .venv/bin/python scripts/demo.py "$@"
