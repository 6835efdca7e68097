"""The bundled tiny open_clip model configs (``structure-tiny``) and their registration."""
from __future__ import annotations

import os

MODEL_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")


def register_model_configs() -> None:
    """Make the bundled tiny configs (e.g. ``structure-tiny``) known to open_clip."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
