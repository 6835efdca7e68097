"""Retrieval measures on the cosine matrix of image/text embeddings: instance-level R@k
(standard CLIP protocol), class-level R@k (any candidate of the query's class is a hit) and
caption-level R@k (identical captions are one instance). Computed in row blocks of at most
``embedding_input._BLOCK_ELEMENTS`` similarities.

Every measure takes ``text_image`` (optional): with several captions per image, ``txt`` holds one
row per caption and ``text_image[j]`` is the image row of caption ``j`` (the COCO protocol, as in
CLIP_benchmark's ``zeroshot_retrieval``): an image query is a hit when ANY of its captions is in
its top k, a caption query when its own image is. Without it (or with one caption per image in
image order) rows are pairs and the numbers are those of the paired protocol.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import inputs as EI
from .inputs import _embeddings, _labels, _paired

__all__ = ["retrieval_recall", "class_retrieval_recall", "caption_retrieval_recall", "caption_owners"]


def caption_owners(text_image, n_images: int, n_texts: int):
    """``text_image`` checked (1-D integers, one per caption, each an image row, every image with
    at least one caption) as an int64 array; None when it is None or the identity (one caption per
    image, in image order: the paired protocol)."""
    if text_image is None:
        if n_images != n_texts:
            raise ValueError(f"img and txt must have the same number of rows (pairs), got {n_images} and {n_texts}; "
                             "for several captions per image give text_image (the image row of each caption)")
        return None
    owners = np.asarray(text_image.detach().cpu() if hasattr(text_image, "detach") else text_image)
    if owners.ndim != 1 or owners.shape[0] != n_texts:
        raise ValueError(f"text_image must be 1-D with one entry per caption row ({n_texts}), got shape {owners.shape}")
    if owners.size and owners.dtype.kind not in "iu":
        raise ValueError(f"text_image must hold integer image rows, got dtype {owners.dtype}")
    owners = owners.astype(np.int64)
    if owners.size and (owners.min() < 0 or owners.max() >= n_images):
        raise ValueError(f"text_image entries must be image rows in [0, {n_images}), "
                         f"got {owners.min()}..{owners.max()}")
    missing = np.setdiff1d(np.arange(n_images), owners)
    if missing.size:
        raise ValueError(f"{missing.size} image(s) have no caption in text_image, e.g. row {int(missing[0])}")
    if n_images == n_texts and np.array_equal(owners, np.arange(n_images)):
        return None
    return owners


def _unpaired(img, txt, text_image):
    """(unit image rows, unit caption rows, owners or None); owners None = paired rows."""
    a, b = _embeddings(img, "img"), _embeddings(txt, "txt")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"img and txt must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    return a, b, caption_owners(text_image, a.shape[0], b.shape[0])


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


def _ks(ks) -> list[int]:
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def retrieval_recall(img, txt, ks: Sequence[int] = (1, 5, 10), text_image=None) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval on the cosine matrix.

    ``S = img_n @ txt_n^T`` (L2-normalised rows); the true match of ``img_i`` is ``txt_i``.
    rank_i = number of candidates scoring strictly higher than the true match (ties count
    in favour of the match); R@k = mean_i [rank_i < k]. Computed in row blocks (no N x N
    matrix in memory). Returns ``{"i2t_r1": ..., "t2i_r1": ..., ...}`` as fractions in [0, 1].
    With ``text_image`` (several captions per image, module docstring): an image's rank is that of
    its best-scoring caption (i2t, averaged over images), a caption's that of its image (t2i,
    averaged over captions).
    """
    ks = _ks(ks)
    a, b, owners = _unpaired(img, txt, text_image)
    if owners is not None:
        ids = np.arange(a.shape[0])
        return {f"{name}_r{k}": r for name, (q, g, yq, yg) in (("i2t", (a, b, ids, owners)),
                                                               ("t2i", (b, a, owners, ids)))
                for k, r in zip(ks, _class_hits_one_way(q, g, yq, yg, ks))}
    out = {}
    for name, (q, g) in (("i2t", (a, b)), ("t2i", (b, a))):
        for k, r in zip(ks, _recall_one_way(q, g, ks)):
            out[f"{name}_r{k}"] = r
    return out


def _class_hits_one_way(q: np.ndarray, g: np.ndarray, yq: np.ndarray, yg: np.ndarray, ks: Sequence[int]) -> list[float]:
    """Fraction of queries whose top-k gallery items hold at least one item of the query's class."""
    first = best_match_ranks(q, g, yq, yg)
    return [float((first < k).mean()) for k in ks]


def best_match_ranks(q: np.ndarray, g: np.ndarray, yq: np.ndarray, yg: np.ndarray) -> np.ndarray:
    """Per query (unit rows ``q`` against unit rows ``g``): the number of gallery items scoring
    strictly higher than its best-scoring match (``yg == yq``), 0 = a match ranked first."""
    n = q.shape[0]
    rows = max(1, EI._BLOCK_ELEMENTS // g.shape[0])
    first = np.empty(n, dtype=np.int64)  # rank of the best-scoring same-class candidate
    for start in range(0, n, rows):
        sims = q[start : start + rows] @ g.T
        same = yq[start : start + sims.shape[0], None] == yg[None, :]
        best = np.where(same, sims, -np.inf).max(axis=1, keepdims=True)
        first[start : start + sims.shape[0]] = (sims > best).sum(axis=1)
    return first


def class_retrieval_recall(img, txt, labels, ks: Sequence[int] = (1, 5, 10), text_image=None) -> dict[str, float]:
    """Class-level Recall@k both ways: a hit when any of the top-k candidates has the query's class.

    On the cosine matrix ``S = img_n @ txt_n^T`` with the class of pair ``i`` being ``labels[i]``:
    for an image query, rank = number of captions scoring strictly higher than the best caption of
    its own class (ties in favour of the class); R@k = mean [rank < k]; text queries likewise
    against the images. Unlike instance-level :func:`retrieval_recall`, this stays meaningful when
    many captions are identical (template captions). Returns ``{"i2t_class_r1": ..., "t2i_class_r1":
    ..., ...}``. Computed in row blocks. With ``text_image``, ``labels`` has one entry per IMAGE
    and each caption carries its image's label.
    """
    ks = _ks(ks)
    a, b, owners = _unpaired(img, txt, text_image)
    y = _labels(labels, a.shape[0])
    yt = y if owners is None else y[owners]
    out = {}
    for name, (q, g, yq, yg) in (("i2t", (a, b, y, yt)), ("t2i", (b, a, yt, y))):
        for k, r in zip(ks, _class_hits_one_way(q, g, yq, yg, ks)):
            out[f"{name}_class_r{k}"] = r
    return out


def caption_retrieval_recall(img, txt, captions, ks: Sequence[int] = (1, 5, 10), text_image=None) -> dict[str, float]:
    """Instance-level Recall@k that treats pairs with the *same caption text* as one instance.

    Where captions repeat (template captions), instance R@k is ill-posed: the true caption of an
    image cannot be told from its identical copies. Here any caption equal to the query's own
    caption (an image query) or any image whose caption equals the query (a text query) is a hit:
    :func:`class_retrieval_recall` with the distinct caption strings as the classes. With unique
    captions it equals :func:`retrieval_recall`. Returns ``{"i2t_caption_r1": ..., ...}``.
    With ``text_image`` (``captions``: one string per caption row), caption ``j`` and image ``i``
    match when one of image ``i``'s captions has caption ``j``'s text: an image query is a hit when
    a caption equal to any of its own captions is in its top k, a caption query when an image with
    an equal caption is.
    """
    captions = list(captions)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cid = np.array([ids[c] for c in captions], dtype=np.int64)
    a, b, owners = _unpaired(img, txt, text_image)
    if cid.shape[0] != b.shape[0]:
        raise ValueError(f"captions must have one string per caption row ({b.shape[0]}), got {cid.shape[0]}")
    if owners is None:
        res = class_retrieval_recall(a, b, cid, ks)
        return {k.replace("_class_", "_caption_"): v for k, v in res.items()}
    ks = _ks(ks)
    from scipy import sparse

    # has[i, c]: image i has a caption with text id c; caption j matches image i iff has[i, cid[j]]
    has = sparse.csr_matrix((np.ones(len(cid), dtype=bool), (owners, cid)), shape=(a.shape[0], len(ids)))
    has_t = has.T.tocsr()
    i2t = _mask_hits_one_way(a, b, lambda s, e: has[s:e][:, cid].toarray(), ks)
    t2i = _mask_hits_one_way(b, a, lambda s, e: has_t[cid[s:e]].toarray(), ks)
    return {**{f"i2t_caption_r{k}": r for k, r in zip(ks, i2t)}, **{f"t2i_caption_r{k}": r for k, r in zip(ks, t2i)}}


def _mask_hits_one_way(q: np.ndarray, g: np.ndarray, positives, ks: Sequence[int]) -> list[float]:
    """Fraction of queries with a positive among their top k, ``positives(start, stop)`` giving the
    boolean ``[stop - start, len(g)]`` mask of the query rows' positive gallery items (ties count
    for the positive, as in :func:`_class_hits_one_way`)."""
    n = q.shape[0]
    rows = max(1, EI._BLOCK_ELEMENTS // g.shape[0])
    first = np.empty(n, dtype=np.int64)
    for start in range(0, n, rows):
        sims = q[start : start + rows] @ g.T
        stop = start + sims.shape[0]
        best = np.where(positives(start, stop), sims, -np.inf).max(axis=1, keepdims=True)
        first[start:stop] = (sims > best).sum(axis=1)
    return [float((first < k).mean()) for k in ks]
