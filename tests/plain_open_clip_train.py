"""Plain open_clip_train (no plugin), with the bundled tiny config registered: the reference
for the exact no-op test."""
import os
import sys

import open_clip

open_clip.add_model_config(os.path.join(os.path.dirname(__file__), "..", "openclip_structure", "model_configs"))
import open_clip_train.main  # noqa: E402

if __name__ == "__main__":
    sys.exit(open_clip_train.main.main(sys.argv[1:]))
