"""openclip-structure: latent-modality-structure regularizers (Jiang et al., CVPR 2023) and
modality-gap reduction (Grassucci et al., ICLR 2026) for open_clip training.

Train with ``python -m openclip_structure.main`` (or ``torchrun ... -m openclip_structure.main --``)
and open_clip_train's usual flags plus the plugin's (``--gap-atp-weight`` ...).
"""
__version__ = "0.1.0"

from .factory import StructureLoss, create_loss  # noqa: E402

__all__ = ["StructureLoss", "create_loss", "__version__"]
