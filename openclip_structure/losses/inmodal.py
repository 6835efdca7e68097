"""CyCLIP's in-modal contrastive terms (Goel et al., "CyCLIP: Cyclic Contrastive Language-Image
Pretraining", NeurIPS 2022; used as the base objective by Jiang et al., CVPR 2023, arXiv
2303.05952, for its CLIP experiments)::

    L_con = 1/4 (L_V2T + L_T2V + L_V2Va + L_T2Ta)

This module gives the in-modal half, ``(L_V2Va + L_T2Ta) / 2``; the CLIP half is open_clip's own
loss. ``L_V2Va`` is the InfoNCE of the original image embeddings (rows) against the augmented
image embeddings of the global batch (columns; positive: the same sample), with the CLIP logit
scale as inverse temperature.

InfoNCE with local rows against gathered columns: ``CE_i = -log softmax_k(s <r_i, c_k>)[i]``;
statistics ``[sum_i CE_i, n_local]``; the loss is their global ratio (exact under data parallelism).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

from .runtime import FeatureBatch
from ._fused import info_nce_sum
from .base import RegularizerTerm, row_count
from .geometric import _check_paired


def _info_nce_sum(rows: torch.Tensor, cols: torch.Tensor, diag: torch.Tensor,
                  scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """sum_i -log softmax_k(scale <rows_i, cols_k>)[diag_i]; one ``B_local x B_global`` matrix
    (fused forward/backward, :func:`._fused.info_nce_sum`)."""
    return info_nce_sum(rows, cols, diag, scale)


def _check_logit_scale(logit_scale, where: str) -> torch.Tensor:
    if logit_scale is None:
        raise ValueError(f"{where} takes its temperature from the CLIP logit scale, but none was given: "
                         f"build the batch as FeatureBatch(..., logit_scale=...) (or call the term with "
                         f"logit_scale=...)")
    logit_scale = torch.as_tensor(logit_scale)
    if logit_scale.numel() != 1:
        raise ValueError(f"{where}: logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    return logit_scale.reshape(())


class InModalContrastive(RegularizerTerm):
    """CyCLIP's in-modal contrastive terms (Goel et al., NeurIPS 2022; the base objective
    ``L_con`` of Jiang et al., CVPR 2023, arXiv 2303.05952, in its CLIP experiments): ``(L_V2Va + L_T2Ta) / 2``, each an
    InfoNCE of the original view (rows) against the augmented view (columns) of the global batch,
    positive = the same sample, one direction (original -> augmented) as in CyCLIP's code.

    Keys: ``image``, ``image_aug``, ``text``, ``text_aug``. ``text=False`` drops the text half (the
    loss is then ``L_V2Va`` alone, keys ``image``, ``image_aug``): without a real second caption
    the text half would contrast each caption with itself, which carries no invariance signal and
    only pushes captions apart; the launcher does this under ``--text-aug none``. Temperature: the
    CLIP logit scale of the step (``exp`` of the learnt log-scale, as open_clip passes it), read
    from ``FeatureBatch.logit_scale``; its gradient flows into the logit scale as in CyCLIP.
    Statistics: [image CE sum, text CE sum (0 without the text half), local rows].
    """

    name = "inmodal"

    def __init__(self, text: bool = True):
        super().__init__()
        self.text = bool(text)
        self.keys = ("image", "image_aug", "text", "text_aug") if self.text else ("image", "image_aug")

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        scale = _check_logit_scale(batch.logit_scale, "inmodal")
        _check_paired("in-modal contrastive (inmodal)", {"image": batch.rows("image"),
                                                          "image_aug": batch.rows("image_aug")})
        diag = batch.diagonal_index()
        ce_v = _info_nce_sum(batch.rows("image"), batch.cols("image_aug"), diag, scale)
        ce_t = ce_v.new_zeros(())
        if self.text:
            _check_paired("in-modal contrastive (inmodal)", {"text": batch.rows("text"),
                                                              "text_aug": batch.rows("text_aug")})
            ce_t = _info_nce_sum(batch.rows("text"), batch.cols("text_aug"), diag, scale)
        return torch.stack([ce_v, ce_t, row_count(batch, ce_v)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return (stats[0] + stats[1]) / ((2 if self.text else 1) * stats[2])

    def forward(self, features: Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]],
                logit_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Single-process value; ``logit_scale`` is required (the CLIP logit scale)."""
        _check_logit_scale(logit_scale, "inmodal")
        return super().forward(features, logit_scale=logit_scale)


def in_modal_contrastive(img: torch.Tensor, img_aug: torch.Tensor, txt: torch.Tensor, txt_aug: torch.Tensor,
                         logit_scale: torch.Tensor) -> torch.Tensor:
    """CyCLIP's ``(L_V2Va + L_T2Ta) / 2`` of unit-norm ``[N, D]`` embeddings with the CLIP logit scale."""
    feats = {"image": img, "image_aug": img_aug, "text": txt, "text_aug": txt_aug}
    _check_paired("in-modal contrastive (inmodal)", feats)
    return InModalContrastive()(feats, logit_scale=logit_scale)
