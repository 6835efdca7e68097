"""Regularizer terms, one module per paper method; pure functions of embeddings plus thin
``nn.Module`` terms. Nothing here imports open_clip."""
from .base import RegularizerTerm
from .gap import (AlignTruePairs, CentroidUniformity, ModalityUniformity, align_true_pairs,
                  centroid_uniformity, modality_uniformity)
from .bridge import BrownianBridge, brownian_bridge
from .geometric import (AugmentedGeometricConsistency, GeometricConsistency, augmented_geometric_consistency,
                        geometric_consistency)
from .inmodal import InModalContrastive, in_modal_contrastive
from .separation import (IndependentHead, SeparationInModalContrast, SeparationOrthogonality,
                         SeparationUniformity)

__all__ = [
    "RegularizerTerm",
    "AlignTruePairs", "CentroidUniformity", "ModalityUniformity",
    "align_true_pairs", "centroid_uniformity", "modality_uniformity",
    "GeometricConsistency", "AugmentedGeometricConsistency", "geometric_consistency",
    "augmented_geometric_consistency",
    "BrownianBridge", "brownian_bridge",
    "SeparationOrthogonality", "SeparationInModalContrast", "SeparationUniformity", "IndependentHead",
    "InModalContrastive", "in_modal_contrastive",
]
