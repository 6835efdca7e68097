#!/usr/bin/env bash
# Create .venv (once) with the pinned torch/torchvision and this package in editable mode.
# Re-running is cheap: it reinstalls only when setup.cfg changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.startswith('2.14.1') and torchvision.__version__.startswith('0.29.1')) else 1)" 2>/dev/null; then
    echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
    "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
stamp=.venv/.openclip_structure_setup
want=$(sha256sum setup.cfg | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing openclip-structure and its dependencies"
    "$VPY" -m pip install -q -e '.[test,plots]'
    echo "$want" > "$stamp"
fi
"$VPY" -c "import open_clip, open_clip_train, openclip_structure; print('[setup] ok: open_clip', open_clip.__version__, '| openclip_structure', openclip_structure.__version__)"
