"""The bundled tiny open_clip model configs (``structure-tiny``, ``structure-tiny-rn``) and the user's own
config folders (``--model-config-dir``): their registration with open_clip."""
from __future__ import annotations

import os

MODEL_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")


def register_model_configs() -> None:
    """Make the bundled tiny configs (e.g. ``structure-tiny``) known to open_clip."""
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)


def config_dir(text: str) -> str:
    """argparse type of ``--model-config-dir``: a folder holding at least one open_clip ``<model>.json``."""
    import argparse

    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    if not any(name.endswith(".json") for name in os.listdir(text)):
        raise argparse.ArgumentTypeError(f"{text} holds no open_clip model config (<model>.json)")
    return text


def register_user_configs(folders) -> None:
    """Make the configs of each ``--model-config-dir`` folder known to open_clip, under their file names
    (so ``--model NAME --pretrained ckpt.pt`` loads the checkpoint, as for open_clip's own configs)."""
    import open_clip

    for folder in folders or ():
        open_clip.add_model_config(folder)
