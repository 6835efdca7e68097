"""Geometric consistency (Jiang et al., "Understanding and Constructing Latent Modality Structures
in Multi-modal Representation Learning", CVPR 2023, arXiv 2303.05952, section "geometric consistency"), intra- and
inter-modality regularization::

    L_gc   = (1/N) sum_j sum_k [ (<zV_j, zT_k> - <zV_k, zT_j>)^2 + (<zV_j, zV_k> - <zT_j, zT_k>)^2 ]
    L_gc^a = (1/N) sum_j sum_k [ (<zV_j, zV_k> - <zaV_j, zaV_k>)^2 + (<zT_j, zT_k> - <zaT_j, zaT_k>)^2 ]
           + (1/N) sum_j (<zV_j, zT_j> - <zaV_j, zaT_j>)^2

Raw cosines, no temperature. L_gc is CyCLIP's cyclic loss (Goel et al., NeurIPS 2022: cross-modal
plus in-modal consistency); CyCLIP computes it as a mean of squares times N, which is the same
number. All inputs are L2-normalised ``[N, D]`` embeddings; N is the global batch. Under data
parallelism each process sums its local rows j against the gathered columns k, so no process builds
more than ``B_local x B_global`` matrices, and the value and DDP-averaged gradient are exactly those
of one process on the global batch.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..distributed import FeatureBatch
from .base import RegularizerTerm, row_count


def _check_paired(where: str, named: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the term unless every tensor is a non-empty ``[N, D]`` of one shape."""
    shapes = {k: tuple(v.shape) for k, v in named.items()}
    if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: {', '.join(shapes)} must be [N, D] tensors of the same shape, got {shapes}")
    if next(iter(shapes.values()))[0] == 0:
        raise ValueError(f"{where}: empty batch, got shapes {shapes}")


class GeometricConsistency(RegularizerTerm):
    """L_gc of Jiang et al. (CVPR 2023, arXiv 2303.05952, section "geometric consistency", first equation), which is
    CyCLIP's cyclic loss (Goel et al., NeurIPS 2022): for every ordered pair (j, k) of the global
    batch, the cross-modal similarity must be symmetric, ``<zV_j, zT_k> = <zV_k, zT_j>``, and the
    image and text in-modal similarities must agree, ``<zV_j, zV_k> = <zT_j, zT_k>``. Summed over
    all N^2 ordered pairs (the diagonal of the in-modal part is 0 for unit inputs) and divided by N.

    Keys: ``image``, ``text``. No constructor arguments (the spec fixes raw cosines, no temperature).
    Statistics: [cross-modal sum, in-modal sum, local rows].
    """

    name = "gc"
    keys = ("image", "text")

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        rv, rt = batch.rows("image"), batch.rows("text")
        _check_paired("geometric consistency (gc)", {"image": rv, "text": rt})
        cv, ct = batch.cols("image"), batch.cols("text")
        # row j of V T^T minus column j of V T^T (= row j of T V^T): both B_local x B_global
        cross = rv @ ct.t() - rt @ cv.t()
        inmodal = rv @ cv.t() - rt @ ct.t()
        s_cross = (cross ** 2).sum()
        return torch.stack([s_cross, (inmodal ** 2).sum(), row_count(batch, s_cross)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return (stats[0] + stats[1]) / stats[2]


class AugmentedGeometricConsistency(RegularizerTerm):
    """L_gc^a of Jiang et al. (CVPR 2023, arXiv 2303.05952, section "geometric consistency", the
    augmented-view equation): each modality's in-modal similarity structure must be the same for the original
    and the augmented views (all N^2 ordered pairs, divided by N), and each sample's image-text
    cosine must be the same for both views (divided by N).

    Keys: ``image``, ``text``, ``image_aug``, ``text_aug``. A caller without text augmentation
    passes ``text_aug = text`` (the same tensor): the text in-modal part is then exactly 0 and is
    skipped (no extra gather). Statistics: [image in-modal sum, text in-modal sum, paired sum,
    local rows].
    """

    name = "gc_aug"
    keys = ("image", "text", "image_aug", "text_aug")

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        rows = {k: batch.rows(k) for k in self.keys}
        _check_paired("augmented geometric consistency (gc_aug)", rows)
        rv, rt, rva, rta = (rows[k] for k in self.keys)
        cv, cva = batch.cols("image"), batch.cols("image_aug")
        s_img = ((rv @ cv.t() - rva @ cva.t()) ** 2).sum()
        if rta is rt:  # no text augmentation: <zT_j, zT_k> - <zT_j, zT_k> = 0 exactly
            s_txt = torch.zeros_like(s_img)
        else:
            ct, cta = batch.cols("text"), batch.cols("text_aug")
            s_txt = ((rt @ ct.t() - rta @ cta.t()) ** 2).sum()
        s_pair = (((rv * rt).sum(-1) - (rva * rta).sum(-1)) ** 2).sum()
        return torch.stack([s_img, s_txt, s_pair, row_count(batch, s_img)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return (stats[0] + stats[1] + stats[2]) / stats[3]


# ---- pure functional forms (single process) -----------------------------------------------

def geometric_consistency(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """L_gc (Jiang et al. 2023; CyCLIP's cyclic loss) of unit-norm ``[N, D]`` image/text embeddings."""
    _check_paired("geometric consistency (gc)", {"image": img, "text": txt})
    return GeometricConsistency()({"image": img, "text": txt})


def augmented_geometric_consistency(img: torch.Tensor, txt: torch.Tensor, img_aug: torch.Tensor,
                                    txt_aug: torch.Tensor) -> torch.Tensor:
    """L_gc^a (Jiang et al. 2023) of unit-norm ``[N, D]`` embeddings of two views; pass
    ``txt_aug=txt`` when the text is not augmented."""
    feats = {"image": img, "text": txt, "image_aug": img_aug, "text_aug": txt_aug}
    _check_paired("augmented geometric consistency (gc_aug)", feats)
    return AugmentedGeometricConsistency()(feats)
