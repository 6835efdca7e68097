"""Build webdataset shards for open_clip training; see ``openclip_structure.data.cli``.

    python scripts/make_shards.py --source digits --out data/digits
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openclip_structure.data.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
