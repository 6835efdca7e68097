"""``python -m openclip_structure.export``: export a training checkpoint to a local-dir model that plain open_clip loads.

The command's code is :mod:`openclip_structure.evaluation.exporter` (openclip_structure/evaluation/exporter.py)."""
import sys

from .evaluation.exporter import main

if __name__ == "__main__":
    sys.exit(main())
