"""``python -m openclip_structure.patch``: apply, check or revert the plugin-hook patch of the installed open_clip_train.

The command's code is :mod:`openclip_structure.integration.hook_patch` (openclip_structure/integration/hook_patch.py)."""
import sys

from .integration.hook_patch import run

if __name__ == "__main__":
    sys.exit(run())
