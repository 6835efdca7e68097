"""``python -m openclip_structure.evaluate``: the standalone evaluator: gap, group-level and zero-shot metrics of open_clip checkpoints.

The command's code is :mod:`openclip_structure.evaluation.evaluator` (openclip_structure/evaluation/evaluator.py)."""
import sys

from .evaluation.evaluator import main

if __name__ == "__main__":
    sys.exit(main())
