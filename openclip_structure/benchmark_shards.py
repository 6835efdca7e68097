"""``python -m openclip_structure.benchmark_shards``: labelled shards in CLIP_benchmark's local webdataset layout.

The command's code is :mod:`openclip_structure.evaluation.benchmark_data` (openclip_structure/evaluation/benchmark_data.py)."""
import sys

from .evaluation.benchmark_data import main

if __name__ == "__main__":
    sys.exit(main())
