"""openclip-structure: latent-modality-structure regularizers (Jiang et al., CVPR 2023) and
modality-gap reduction (Grassucci et al., ICLR 2026) for open_clip training.

Train with ``python -m openclip_structure.main`` (or ``torchrun ... -m openclip_structure.main --``)
and open_clip_train's usual flags plus the plugin's (``--gap-atp-weight`` ...).
"""
__version__ = "0.1.0"

__all__ = ["StructureLoss", "create_loss", "__version__"]


def __getattr__(name):
    """``StructureLoss``/``create_loss`` on first use: importing the package (e.g. for
    ``python -m openclip_structure.patch``) does not import torch."""
    if name in ("StructureLoss", "create_loss"):
        from . import factory

        return getattr(factory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
