"""Regularizer terms, one module per paper method; pure functions of embeddings plus thin
``nn.Module`` terms. Nothing here imports open_clip."""
from .base import RegularizerTerm
from .gap import (AlignTruePairs, CentroidUniformity, ModalityUniformity, align_true_pairs,
                  centroid_uniformity, modality_uniformity)

__all__ = [
    "RegularizerTerm",
    "AlignTruePairs", "CentroidUniformity", "ModalityUniformity",
    "align_true_pairs", "centroid_uniformity", "modality_uniformity",
]
