"""Deep feature separation (Jiang et al., "Understanding and Constructing Latent Modality Structures
in Multi-modal Representation Learning", CVPR 2023, arXiv 2303.05952, section "deep feature separation"), intra-modality
regularization with an extra "independent" head per tower::

    L_sep  = L_ortho + L_icon + L_iuni                       (unit internal weights)
    L_ortho = (1/N) sum_j ( <zV_j, ziV_j>^2 + <zT_j, ziT_j>^2 )
    L_icon  = InfoNCE(ziV -> ziaV) and InfoNCE(ziT -> ziaT), averaged over the two modalities
    L_iuni  = log( (1/N^2) sum_j sum_k [ G(ziV_j, ziV_k) + G(ziT_j, ziT_k) ] ),  G(u,v) = exp(-2||u-v||^2)

z^i is the L2-normalised output of :class:`IndependentHead`, fed with the same backbone output that
feeds the shared projection (not with z). The three parts are three terms so that each is logged on
its own; the training flag weights all three with one number.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import FeatureBatch
from .base import RegularizerTerm, pair_kernel_sums, row_count
from .geometric import _check_paired
from .inmodal import _info_nce_sum


class IndependentHead(nn.Module):
    """The independent projection head of deep feature separation (Jiang et al., CVPR 2023, arXiv
    2303.05952, deep feature separation): ``[B, width] -> [B, embed_dim]``, L2-normalised z^i.

    Design (the paper's appendix could not be read; our choice): a bias-free linear map stored as a
    ``width x embed_dim`` matrix parameter ``proj`` exactly like open_clip's own ``proj`` /
    ``text_projection``, initialised the same way (normal, std ``width ** -0.5``), applied to the
    backbone's pooled output (the input of the shared projection), followed by L2 normalisation.
    """

    def __init__(self, width: int, embed_dim: int, dtype=None, device=None):
        super().__init__()
        if int(width) < 1 or int(embed_dim) < 1:
            raise ValueError(f"IndependentHead: width and embed_dim must be positive, got {width}, {embed_dim}")
        self.width, self.embed_dim = int(width), int(embed_dim)
        self.proj = nn.Parameter(torch.empty(self.width, self.embed_dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj, std=self.width ** -0.5)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.dim() != 2 or pooled.shape[-1] != self.width:
            raise ValueError(f"IndependentHead: expected pooled backbone features [B, {self.width}], "
                             f"got shape {tuple(pooled.shape)}")
        return F.normalize(pooled @ self.proj.to(pooled.dtype), dim=-1)

    def extra_repr(self) -> str:
        return f"width={self.width}, embed_dim={self.embed_dim}"


class SeparationOrthogonality(RegularizerTerm):
    """L_ortho of Jiang et al. (CVPR 2023, arXiv 2303.05952, deep feature separation):
    the shared and the independent embedding of each sample should be orthogonal,
    ``(1/N) sum_j (<zV_j, ziV_j>^2 + <zT_j, ziT_j>^2)`` (the two modalities summed, as printed).

    Keys: ``image``, ``text``, ``image_ind``, ``text_ind``. Statistics: [image sum, text sum,
    local rows].
    """

    name = "sep_ortho"
    keys = ("image", "text", "image_ind", "text_ind")

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        where = "separation orthogonality (sep_ortho)"
        zv, zt, iv, it = (batch.rows(k) for k in self.keys)
        _check_paired(where, {"image": zv, "image_ind": iv})
        _check_paired(where, {"text": zt, "text_ind": it})
        s_v = ((zv * iv).sum(-1) ** 2).sum()
        s_t = ((zt * it).sum(-1) ** 2).sum()
        return torch.stack([s_v, s_t, row_count(batch, s_v)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return (stats[0] + stats[1]) / stats[2]


class SeparationInModalContrast(RegularizerTerm):
    """L_icon of Jiang et al. (CVPR 2023, arXiv 2303.05952, deep feature separation):
    InfoNCE between the independent features of the original view (rows) and of the augmented view
    (columns of the global batch; positive = the same sample), per modality, averaged over the two
    modalities. The printed formula's self-similarity numerator is a typo (spec); we use the
    augmented view as positive, one direction (original -> augmented) like CyCLIP's in-modal terms.

    Keys: ``image_ind``, ``image_aug_ind``, ``text_ind``, ``text_aug_ind``.
    ``temperature`` (default 0.1; the spec leaves it open, our choice, a SimCLR-style fixed value
    since the independent heads have no learnt logit scale of their own): logits are
    ``<u, v> / temperature``. ``text=False`` drops the text half (keys ``image_ind``,
    ``image_aug_ind``; the loss is the image InfoNCE alone), for training without a real second
    caption, where it would contrast each caption's independent features with themselves.
    Statistics: [image CE sum, text CE sum (0 without the text half), local rows].
    """

    name = "sep_icon"

    def __init__(self, temperature: float = 0.1, text: bool = True):
        super().__init__()
        self.text = bool(text)
        self.keys = (("image_ind", "image_aug_ind", "text_ind", "text_aug_ind") if self.text
                     else ("image_ind", "image_aug_ind"))
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise ValueError(f"sep_icon: temperature must be a positive number, got {temperature!r}") from None
        if not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"sep_icon: temperature must be a positive finite number, got {temperature}")
        self.temperature = temperature

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        where = "separation in-modal contrast (sep_icon)"
        _check_paired(where, {"image_ind": batch.rows("image_ind"), "image_aug_ind": batch.rows("image_aug_ind")})
        diag = batch.diagonal_index()
        scale = 1.0 / self.temperature
        ce_v = _info_nce_sum(batch.rows("image_ind"), batch.cols("image_aug_ind"), diag, scale)
        ce_t = ce_v.new_zeros(())
        if self.text:
            _check_paired(where, {"text_ind": batch.rows("text_ind"), "text_aug_ind": batch.rows("text_aug_ind")})
            ce_t = _info_nce_sum(batch.rows("text_ind"), batch.cols("text_aug_ind"), diag, scale)
        return torch.stack([ce_v, ce_t, row_count(batch, ce_v)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return (stats[0] + stats[1]) / ((2 if self.text else 1) * stats[2])


class SeparationUniformity(RegularizerTerm):
    """L_iuni of Jiang et al. (CVPR 2023, arXiv 2303.05952, deep feature separation):
    Wang & Isola uniformity (t = 2) of the independent features, exactly as printed:
    ``log( (1/N^2) sum_j sum_k [G(ziV_j, ziV_k) + G(ziT_j, ziT_k)] )``, i.e. ONE log of the sum of
    both modalities' kernels, over all N^2 ordered pairs INCLUDING j = k (each diagonal pair
    contributes G(u, u) = 1, added exactly as a constant 2 per sample; the printed normaliser 1/N^2,
    not 1/(2 N^2), only shifts the value by log 2).

    Keys: ``image_ind``, ``text_ind``. Statistics: [kernel sum incl. diagonal, N_local * N_global].
    """

    name = "sep_iuni"
    keys = ("image_ind", "text_ind")
    t = 2.0

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        iv, it = batch.rows("image_ind"), batch.rows("text_ind")
        where = "separation uniformity (sep_iuni)"
        _check_paired(where, {"image_ind": iv})
        _check_paired(where, {"text_ind": it})
        diag = batch.diagonal_index()
        total = (pair_kernel_sums(iv, batch.cols("image_ind"), diag, self.t, symmetric=True)
                 + pair_kernel_sums(it, batch.cols("text_ind"), diag, self.t, symmetric=True)
                 + 2.0 * batch.n_local)
        pairs = row_count(batch, total) * batch.n_global
        return torch.stack([total, pairs])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return torch.log(stats[0] / stats[1])
