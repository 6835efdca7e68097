"""Export a training checkpoint as an open_clip ``local-dir:`` folder; see ``openclip_structure.evaluation.exporter``.

    python scripts/export.py --model structure-tiny --checkpoint logs/run/checkpoints/epoch_1.pt --out exported/run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openclip_structure.evaluation.exporter import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
