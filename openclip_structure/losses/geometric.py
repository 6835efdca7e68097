"""Geometric consistency (Jiang et al., "Understanding and Constructing Latent Modality Structures
in Multi-modal Representation Learning", CVPR 2023, arXiv 2303.05952, section "geometric consistency"), intra- and
inter-modality regularization::

    L_gc   = (1/N) sum_j sum_k [ (<zV_j, zT_k> - <zV_k, zT_j>)^2 + (<zV_j, zV_k> - <zT_j, zT_k>)^2 ]
    L_gc^a = (1/N) sum_j sum_k [ (<zV_j, zV_k> - <zaV_j, zaV_k>)^2 + (<zT_j, zT_k> - <zaT_j, zaT_k>)^2 ]
           + (1/N) sum_j (<zV_j, zT_j> - <zaV_j, zaT_j>)^2

Raw cosines, no temperature. L_gc is CyCLIP's cyclic loss (Goel et al., NeurIPS 2022: cross-modal
plus in-modal consistency); CyCLIP computes it as a mean of squares times N, which is the same
number. All inputs are L2-normalised ``[N, D]`` embeddings; N is the global batch. Under data
parallelism each process sums its local rows j against the gathered columns k (pairwise form: at
most one ``B_local x B_global`` matrix per sum) or sums ``D x D`` Gram matrices over its local rows
(Gram form: no gather, no batch x batch matrix, O(B_local D^2); the default from B_global ~ 1.5-2 D),
and the value and DDP-averaged gradient are exactly those of one process on the global batch.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

from .runtime import FeatureBatch
from ._fused import gram, squared_product_norm, use_gram_form
from .base import RegularizerTerm, row_count


def _check_paired(where: str, named: Mapping[str, torch.Tensor]) -> None:
    """ValueError naming the term unless every tensor is a non-empty ``[N, D]`` of one shape."""
    shapes = {k: tuple(v.shape) for k, v in named.items()}
    if any(len(s) != 2 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: {', '.join(shapes)} must be [N, D] tensors of the same shape, got {shapes}")
    if next(iter(shapes.values()))[0] == 0:
        raise ValueError(f"{where}: empty batch, got shapes {shapes}")


FORMS = ("auto", "pairwise", "gram")


def _check_form(form: str, where: str) -> str:
    if form not in FORMS:
        raise ValueError(f"{where}: form must be one of {FORMS}, got {form!r}")
    return form


def _square_side(n: int, blocks: int) -> Optional[int]:
    """D when ``n == blocks * D * D`` (D >= 1), else None."""
    if n <= 0 or n % blocks:
        return None
    d = math.isqrt(n // blocks)
    return d if d >= 1 and d * d * blocks == n else None


class GeometricConsistency(RegularizerTerm):
    """L_gc of Jiang et al. (CVPR 2023, arXiv 2303.05952, section "geometric consistency", first equation), which is
    CyCLIP's cyclic loss (Goel et al., NeurIPS 2022): for every ordered pair (j, k) of the global
    batch, the cross-modal similarity must be symmetric, ``<zV_j, zT_k> = <zV_k, zT_j>``, and the
    image and text in-modal similarities must agree, ``<zV_j, zV_k> = <zT_j, zT_k>``. Summed over
    all N^2 ordered pairs (the diagonal of the in-modal part is 0 for unit inputs) and divided by N.

    Keys: ``image``, ``text``. No loss hyper-parameters (the spec fixes raw cosines, no temperature).

    Computation (exact, no approximation): with ``P = zV + zT`` and ``M = zV - zT`` (rows = samples),
    ``<P_j, M_k> = (<V_j,V_k> - <T_j,T_k>) - (<V_j,T_k> - <V_k,T_j>)`` and the same with j, k swapped
    has the opposite cross part, so summed over all ordered pairs::

        sum_{j,k} [(<V_j,T_k> - <V_k,T_j>)^2 + (<V_j,V_k> - <T_j,T_k>)^2] = sum_{j,k} <P_j, M_k>^2
                                                                    = < P^T P, M^T M >_F

    ``form="pairwise"``: local rows of P against the gathered M, one ``B_local x B_global`` matrix,
    O(B_local B_global D); statistics ``[sum_{j local, k} <P_j, M_k>^2, local rows]``.
    ``form="gram"``: the two ``D x D`` Gram matrices, sums over the local rows, ARE the statistics
    (``[vec(P^T P), vec(M^T M), local rows]``, summed over processes by the one all-reduce): no
    gather, no batch x batch matrix, O(B_local D^2). ``"auto"`` (default) takes the Gram form when
    ``B_global >= D (1.25 + 160 / B_local)`` (where it is the cheaper one on CPU; e.g. from 1.4 D at
    B_local = 1024: the usual large-batch case).
    """

    name = "gc"
    keys = ("image", "text")

    def __init__(self, form: str = "auto"):
        super().__init__()
        self.form = _check_form(form, "gc")

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        rv, rt = batch.rows("image"), batch.rows("text")
        _check_paired("geometric consistency (gc)", {"image": rv, "text": rt})
        p = rv + rt
        if use_gram_form(batch.n_global, batch.n_local, rv.shape[1], self.form, crossover=1.25, overhead_rows=160):
            n = row_count(batch, p).view(1)
            return torch.cat([gram(p).reshape(-1), gram(rv - rt).reshape(-1), n])
        m_cols = batch.cols("image") - batch.cols("text")
        s = squared_product_norm(p, m_cols)
        return torch.stack([s, row_count(batch, s)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        if stats.numel() == 2:  # pairwise form
            return stats[0] / stats[1]
        d = _square_side(stats.numel() - 1, 2)
        if d is None:
            raise ValueError(f"gc: statistics of unexpected size {stats.numel()}")
        # split (not slicing): its backward is one concatenation, not a zero-filled copy per slice
        gp, gm, n = stats.split([d * d, d * d, 1])
        return torch.dot(gp, gm) / n[0]


class AugmentedGeometricConsistency(RegularizerTerm):
    """L_gc^a of Jiang et al. (CVPR 2023, arXiv 2303.05952, section "geometric consistency", the
    augmented-view equation): each modality's in-modal similarity structure must be the same for the original
    and the augmented views (all N^2 ordered pairs, divided by N), and each sample's image-text
    cosine must be the same for both views (divided by N).

    Keys: ``image``, ``text``, ``image_aug``, ``text_aug``. A caller without text augmentation
    passes ``text_aug = text`` (the same tensor): the text in-modal part is then exactly 0 and is
    skipped (no extra gather).

    Computation (exact): per modality, with ``P = z + z^a`` and ``M = z - z^a``,
    ``<z_j,z_k> - <z^a_j,z^a_k> = (<P_j,M_k> + <M_j,P_k>) / 2`` (small when the views agree, so no
    cancellation of large terms), hence the in-modal sum is
    ``1/4 sum_{j,k} <[P_j, M_j], [M_k, P_k]>^2 = 1/2 (<P^T P, M^T M>_F + <M^T P, P^T M>_F)``.
    ``form="pairwise"``: one ``B_local x B_global`` matrix per modality (the pair function is
    symmetric, so only the local rows get gradient, doubled, and no gradient flows through the
    gather); statistics ``[image sum, text sum, paired sum, local rows]``. ``form="gram"``: the
    ``D x D`` matrices ``P^T P``, ``M^T M``, ``M^T P`` of each modality are the statistics
    (``[image 3 D^2, (text 3 D^2), paired sum, local rows]``), O(B_local D^2), no gather.
    ``"auto"`` (default): the Gram form when ``B_global >= D (1.75 + 256 / B_local)`` (2 D at
    B_local = 1024).
    """

    name = "gc_aug"
    keys = ("image", "text", "image_aug", "text_aug")

    def __init__(self, form: str = "auto"):
        super().__init__()
        self.form = _check_form(form, "gc_aug")

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        rows = {k: batch.rows(k) for k in self.keys}
        _check_paired("augmented geometric consistency (gc_aug)", rows)
        rv, rt, rva, rta = (rows[k] for k in self.keys)
        s_pair = (((rv * rt).sum(-1) - (rva * rta).sum(-1)) ** 2).sum()
        n = row_count(batch, s_pair)
        # no text augmentation (text_aug is text): <zT_j, zT_k> - <zT_j, zT_k> = 0 exactly, skipped
        modalities = [("image", "image_aug")] + ([] if rta is rt else [("text", "text_aug")])
        if use_gram_form(batch.n_global, batch.n_local, rv.shape[1], self.form, crossover=1.75, overhead_rows=256):
            parts = []
            for key, key_aug in modalities:
                p, m = rows[key] + rows[key_aug], rows[key] - rows[key_aug]
                parts += [gram(p).reshape(-1), gram(m).reshape(-1), torch.mm(m.t(), p).reshape(-1)]
            return torch.cat(parts + [s_pair.view(1), n.view(1)])
        sums = []
        for key, key_aug in modalities:
            r, ra = rows[key], rows[key_aug]
            c, ca = batch.cols(key), batch.cols(key_aug)  # cached WITH grad: other terms share them
            with torch.no_grad():  # symmetric pair function: no gradient through the columns
                cols = torch.cat([c - ca, c + ca], dim=1)
            sums.append(squared_product_norm(torch.cat([r + ra, r - ra], dim=1), cols, symmetric=True) / 4)
        s_img = sums[0]
        s_txt = sums[1] if len(sums) > 1 else torch.zeros_like(s_img)
        return torch.stack([s_img, s_txt, s_pair, n])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        if stats.numel() == 4:  # pairwise form
            return (stats[0] + stats[1] + stats[2]) / stats[3]
        size = stats.numel() - 2
        d = _square_side(size, 3)
        n_mod = 1
        if d is None:
            d, n_mod = _square_side(size, 6), 2
        if d is None:
            raise ValueError(f"gc_aug: statistics of unexpected size {stats.numel()}")
        *blocks, pair, n = stats.split([d * d] * (3 * n_mod) + [1, 1])
        total = pair[0]
        for i in range(n_mod):
            gp, gm, e = blocks[3 * i:3 * i + 3]
            e = e.view(d, d)
            # <E, E^T> = sum_ab E_ab E_ba
            total = total + 0.5 * (torch.dot(gp, gm) + torch.dot(e.reshape(-1), e.t().reshape(-1)))
        return total / n[0]


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
