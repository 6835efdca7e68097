"""Modality-gap reduction (Grassucci et al., "Closing the Modality Gap Aligns Group-Wise
Semantics", ICLR 2026, arXiv 2601.18525).

    L_total = L_contrastive + lambda_atp * L_ATP + lambda_cu * L_CU

* Align True Pairs (Wang & Isola alignment, alpha = 2), eq. for L_ATP::

      L_ATP = 1/(M-1) sum_{m != a} (1/N) sum_i || z_i^m - z_i^a ||^2

* Centroid Uniformity (Wang & Isola uniformity, t = 2, on re-normalised per-sample centroids)::

      mu_i = normalize( (1/M) sum_m z_i^m ),   L_CU = log( mean_{i != j} exp(-t ||mu_i - mu_j||^2) )

  (mean over ordered pairs = mean over i < j; the paper's (1/N) sum_i sum_{j!=i} differs by a
  constant inside the log, so gradients are the same).
* Per-modality uniformity (Fahim et al. 2024, "It's Not a Modality Gap"), the baseline variant:
  ``(1/M) sum_m log( mean_{i != j} exp(-t ||z_i^m - z_j^m||^2) )``.

All inputs are L2-normalised embeddings ``[N, D]`` of M >= 2 modalities (open_clip's model
outputs are). The pure functions below take a list of M tensors; the ``nn.Module`` terms read
named modalities from a :class:`~openclip_structure.losses.runtime.FeatureBatch` and are exact under
data parallelism.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from .runtime import FeatureBatch
from .base import RegularizerTerm, pair_kernel_sums, row_count


def _check_modalities(embeddings: Sequence[torch.Tensor], where: str) -> None:
    if len(embeddings) < 2:
        raise ValueError(f"{where} needs embeddings of at least 2 modalities, got {len(embeddings)}")
    shapes = [tuple(e.shape) for e in embeddings]
    if any(len(s) != 2 for s in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"{where}: every modality must be a [N, D] tensor of the same shape, got {shapes}")


def _check_t(t: float) -> float:
    t = float(t)
    if not (t > 0 and t <= 50):
        raise ValueError(f"uniformity temperature t must be in (0, 50], got {t}")
    return t


class AlignTruePairs(RegularizerTerm):
    """L_ATP of Grassucci et al. (ICLR 2026): mean squared distance of every non-anchor modality
    to the anchor modality of the same sample, averaged over the M-1 non-anchor modalities."""

    name = "gap_atp"

    def __init__(self, keys: Sequence[str] = ("image", "text"), anchor: str = "image"):
        super().__init__()
        self.keys = tuple(keys)
        if len(self.keys) < 2:
            raise ValueError(f"gap_atp needs at least 2 modalities, got {self.keys}")
        if anchor not in self.keys:
            raise ValueError(f"gap_atp anchor {anchor!r} is not one of the modalities {self.keys}")
        self.anchor = anchor

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        _check_modalities([batch.rows(k) for k in self.keys], "gap_atp")
        a = batch.rows(self.anchor)
        others = [batch.rows(k) for k in self.keys if k != self.anchor]
        sq = sum(((z - a) ** 2).sum() for z in others) / len(others)
        return torch.stack([sq, row_count(batch, sq)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return stats[0] / stats[1]


class CentroidUniformity(RegularizerTerm):
    """L_CU of Grassucci et al. (ICLR 2026): Wang & Isola uniformity (t = 2) of the re-normalised
    per-sample centroids of all M modalities, over every pair of the global batch."""

    name = "gap_cu"

    def __init__(self, keys: Sequence[str] = ("image", "text"), t: float = 2.0):
        super().__init__()
        self.keys = tuple(keys)
        if len(self.keys) < 2:
            raise ValueError(f"gap_cu needs at least 2 modalities, got {self.keys}")
        self.t = _check_t(t)

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        _check_modalities([batch.rows(k) for k in self.keys], "centroid uniformity (gap_cu)")
        if batch.n_global < 2:
            raise ValueError("centroid uniformity (gap_cu) needs a global batch of at least 2 samples")
        # the kernel is symmetric: the local centroids carry the whole gradient (pair_kernel_sums
        # doubles it), the gathered ones are constants (no backward through the gather)
        # (normalize is scale-invariant: the 1/M of the mean is not applied)
        rows = F.normalize(sum(batch.rows(k) for k in self.keys), dim=-1)
        if batch.n_global == batch.n_local:
            cols = rows.detach()
        else:
            gathered = [batch.cols(k) for k in self.keys]  # (cached WITH grad: other terms share them)
            with torch.no_grad():  # [B_global, D], in place: one pass less than F.normalize's division
                cols = gathered[0] + gathered[1]
                for c in gathered[2:]:
                    cols += c
                cols *= torch.linalg.vector_norm(cols, dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        total = pair_kernel_sums(rows, cols, batch.diagonal_index(), self.t, symmetric=True)
        pairs = row_count(batch, total) * (batch.n_global - 1)
        return torch.stack([total, pairs])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return torch.log(stats[0] / stats[1])


class ModalityUniformity(RegularizerTerm):
    """Per-modality uniformity of Fahim et al. (2024), the baseline variant offered beside L_CU
    (``--gap-uniformity modality``): the mean over modalities of each modality's Wang & Isola
    uniformity. Logged under the same key as L_CU (``gap_cu_loss``)."""

    name = "gap_cu"

    def __init__(self, keys: Sequence[str] = ("image", "text"), t: float = 2.0):
        super().__init__()
        self.keys = tuple(keys)
        self.t = _check_t(t)

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        _check_modalities([batch.rows(k) for k in self.keys], "modality uniformity (gap_cu)")
        if batch.n_global < 2:
            raise ValueError("modality uniformity (gap_cu) needs a global batch of at least 2 samples")
        diag = batch.diagonal_index()
        sums = [pair_kernel_sums(batch.rows(k), batch.cols(k), diag, self.t, symmetric=True) for k in self.keys]
        pairs = row_count(batch, sums[0]) * (batch.n_global - 1)
        return torch.stack(sums + [pairs])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return torch.log(stats[:-1] / stats[-1]).mean()


# ---- pure functional forms (single process, list of M modality tensors) --------------------

def _named(embeddings: Sequence[torch.Tensor]) -> Tuple[Tuple[str, ...], dict]:
    keys = tuple(f"m{i}" for i in range(len(embeddings)))
    return keys, dict(zip(keys, embeddings))


def align_true_pairs(embeddings: Sequence[torch.Tensor], anchor: int = 0) -> torch.Tensor:
    """L_ATP (Grassucci et al. 2026) of a list of M >= 2 ``[N, D]`` unit-norm embeddings."""
    _check_modalities(embeddings, "align_true_pairs")
    if not 0 <= anchor < len(embeddings):
        raise ValueError(f"anchor index {anchor} out of range for {len(embeddings)} modalities")
    keys, feats = _named(embeddings)
    return AlignTruePairs(keys, anchor=keys[anchor])(feats)


def centroid_uniformity(embeddings: Sequence[torch.Tensor], t: float = 2.0) -> torch.Tensor:
    """L_CU (Grassucci et al. 2026) of a list of M >= 2 ``[N, D]`` unit-norm embeddings."""
    _check_modalities(embeddings, "centroid_uniformity")
    keys, feats = _named(embeddings)
    return CentroidUniformity(keys, t=t)(feats)


def modality_uniformity(embeddings: Sequence[torch.Tensor], t: float = 2.0) -> torch.Tensor:
    """Fahim et al. (2024) per-modality uniformity averaged over a list of M embeddings."""
    _check_modalities(embeddings, "modality_uniformity")
    keys, feats = _named(embeddings)
    return ModalityUniformity(keys, t=t)(feats)
