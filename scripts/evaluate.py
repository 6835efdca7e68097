"""Evaluate open_clip checkpoints (modality gap, group structure); see ``openclip_structure.evaluation.evaluator``.

    python scripts/evaluate.py --model structure-tiny --pretrained logs/run/checkpoints/epoch_1.pt \
        --data 'data/digits/val/{00000..00001}.tar' --shift --plots figs --out results.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openclip_structure.evaluation.evaluator import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
