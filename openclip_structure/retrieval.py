"""Retrieval measures on the cosine matrix of paired image/text embeddings: instance-level
R@k (standard CLIP protocol), class-level R@k (any candidate of the query's class is a hit) and
caption-level R@k (identical captions are one instance). Computed in row blocks of at most
``embedding_input._BLOCK_ELEMENTS`` similarities.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import embedding_input as EI
from .embedding_input import _labels, _paired

__all__ = ["retrieval_recall", "class_retrieval_recall", "caption_retrieval_recall"]


def _recall_one_way(q: np.ndarray, g: np.ndarray, ks: Sequence[int]) -> list[float]:
    """R@k for queries q against gallery g where the true match of q[i] is g[i]."""
    n = q.shape[0]
    rows = max(1, EI._BLOCK_ELEMENTS // n)
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, rows):
        sims = q[start : start + rows] @ g.T
        idx = np.arange(start, start + sims.shape[0])
        true = sims[np.arange(sims.shape[0]), idx][:, None]
        ranks[idx] = (sims > true).sum(axis=1)  # 0 = true match ranked first
    return [float((ranks < k).mean()) for k in ks]


def retrieval_recall(img, txt, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval on the cosine matrix.

    ``S = img_n @ txt_n^T`` (L2-normalised rows); the true match of ``img_i`` is ``txt_i``.
    rank_i = number of candidates scoring strictly higher than the true match (ties count
    in favour of the match); R@k = mean_i [rank_i < k]. Computed in row blocks (no N x N
    matrix in memory). Returns ``{"i2t_r1": ..., "t2i_r1": ..., ...}`` as fractions in [0, 1].
    """
    a, b = _paired(img, txt)
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    out = {}
    for name, (q, g) in (("i2t", (a, b)), ("t2i", (b, a))):
        for k, r in zip(ks, _recall_one_way(q, g, ks)):
            out[f"{name}_r{k}"] = r
    return out


def _class_hits_one_way(q: np.ndarray, g: np.ndarray, yq: np.ndarray, yg: np.ndarray, ks: Sequence[int]) -> list[float]:
    """Fraction of queries whose top-k gallery items hold at least one item of the query's class."""
    n = q.shape[0]
    rows = max(1, EI._BLOCK_ELEMENTS // g.shape[0])
    first = np.empty(n, dtype=np.int64)  # rank of the best-scoring same-class candidate
    for start in range(0, n, rows):
        sims = q[start : start + rows] @ g.T
        same = yq[start : start + sims.shape[0], None] == yg[None, :]
        best = np.where(same, sims, -np.inf).max(axis=1, keepdims=True)
        first[start : start + sims.shape[0]] = (sims > best).sum(axis=1)
    return [float((first < k).mean()) for k in ks]


def class_retrieval_recall(img, txt, labels, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Class-level Recall@k both ways: a hit when any of the top-k candidates has the query's class.

    On the cosine matrix ``S = img_n @ txt_n^T`` with the class of pair ``i`` being ``labels[i]``:
    for an image query, rank = number of captions scoring strictly higher than the best caption of
    its own class (ties in favour of the class); R@k = mean [rank < k]; text queries likewise
    against the images. Unlike instance-level :func:`retrieval_recall`, this stays meaningful when
    many captions are identical (template captions). Returns ``{"i2t_class_r1": ..., "t2i_class_r1":
    ..., ...}``. Computed in row blocks.
    """
    a, b = _paired(img, txt)
    y = _labels(labels, a.shape[0])
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    out = {}
    for name, (q, g) in (("i2t", (a, b)), ("t2i", (b, a))):
        for k, r in zip(ks, _class_hits_one_way(q, g, y, y, ks)):
            out[f"{name}_class_r{k}"] = r
    return out


def caption_retrieval_recall(img, txt, captions, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Instance-level Recall@k that treats pairs with the *same caption text* as one instance.

    Where captions repeat (template captions), instance R@k is ill-posed: the true caption of an
    image cannot be told from its identical copies. Here any caption equal to the query's own
    caption (an image query) or any image whose caption equals the query (a text query) is a hit:
    :func:`class_retrieval_recall` with the distinct caption strings as the classes. With unique
    captions it equals :func:`retrieval_recall`. Returns ``{"i2t_caption_r1": ..., ...}``.
    """
    captions = list(captions)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    res = class_retrieval_recall(img, txt, np.array([ids[c] for c in captions]), ks)
    return {k.replace("_class_", "_caption_"): v for k, v in res.items()}
