#!/usr/bin/env bash
# GPU check: bf16, FSDP2 and speed on CUDA in one command (scripts/gpu_check.py; docs/performance.md).
#   bash scripts/gpu_check.sh --out gpu_check.json          # one CUDA GPU, <= 8 minutes
#   bash scripts/gpu_check.sh --dry-run --out dry.json      # CPU, tiny shapes (what CI runs)
# Python: $PYTHON, else .venv/bin/python (scripts/setup.sh), else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
