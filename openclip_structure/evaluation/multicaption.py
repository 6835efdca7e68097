"""The measures of :mod:`openclip_structure.evaluation.metrics` on data with several captions per image
(COCO, Flickr30k, recaptioned web data), the COCO protocol.

``img`` holds one row per image, ``txt`` one row per caption, and ``text_image[j]`` is the image
row of caption ``j`` (every image has at least one caption). Every caption is its own text:

* retrieval (:mod:`openclip_structure.evaluation.retrieval`): i2t R@k counts a hit when ANY caption of the
  image is in its top k (averaged over images), t2i R@k is scored per caption (its own image,
  averaged over captions), as CLIP_benchmark's ``zeroshot_retrieval``;
* pair measures run over the (image, caption) pairs, one per caption: ``cos_true_pairs``, the
  matching term of ``relative_gap``, and ``separability`` (each image repeated once per caption,
  so both classes have one row per caption; the 80/20 split is over IMAGES, so no image or caption
  of a test pair is seen in training);
* set measures use every image once and every caption once: ``gap`` (centroid of the images vs
  centroid of the captions), ``intra_image_cos``/``intra_text_cos``, Fang ``uniformity`` on the
  stacked images and captions, and the group measures (k-means, kNN, probe on the mixed
  image+caption set and per modality), where each caption carries its image's label.

With ``text_image`` None, or one caption per image in image order, every function returns exactly
what its paired counterpart in :mod:`openclip_structure.evaluation.metrics` returns.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from . import metrics as M
from .inputs import _labels, _mean
from .retrieval import _unpaired, caption_owners

__all__ = ["caption_owners", "first_captions", "modality_gap", "cos_true_pairs", "gap_metrics", "group_metrics",
           "all_metrics"]


def first_captions(text_image, n_images: int) -> np.ndarray:
    """Row of each image's first caption (for measures defined on one caption per image)."""
    owners = np.asarray(text_image, dtype=np.int64)
    first = np.full(n_images, -1, dtype=np.int64)
    for j in range(len(owners) - 1, -1, -1):
        first[owners[j]] = j
    if (first < 0).any():
        raise ValueError(f"image row {int(np.argmax(first < 0))} has no caption")
    return first


def modality_gap(img, txt, text_image=None) -> float:
    """:func:`metrics.modality_gap`: the centroid of the images vs the centroid of the captions."""
    a, b, owners = _unpaired(img, txt, text_image)
    return M.modality_gap(img, txt) if owners is None else float(np.linalg.norm(_mean(a) - _mean(b)))


def cos_true_pairs(img, txt, text_image=None) -> float:
    """:func:`metrics.cos_true_pairs` over the (image, caption) pairs, one per caption."""
    a, b, owners = _unpaired(img, txt, text_image)
    return M.cos_true_pairs(img, txt) if owners is None else M.cos_true_pairs(a[owners], b)


def _separability(a: np.ndarray, b: np.ndarray, owners: np.ndarray, seed: int) -> float:
    """``metrics.modality_separability`` with the split over images and one image row per caption."""
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"img needs at least 2 images for a train/test split, got {n}")
    train, test = train_test_split(np.arange(n), test_size=0.2, random_state=seed)

    def rows(images):  # the captions of `images`, in their order
        pos = np.full(n, -1)
        pos[images] = np.arange(len(images))
        mine = np.flatnonzero(pos[owners] >= 0)
        return mine[np.argsort(pos[owners[mine]], kind="stable")]

    tr, te = rows(train), rows(test)
    x_train = np.concatenate([a[owners[tr]], b[tr]])
    x_test = np.concatenate([a[owners[te]], b[te]])
    clf = LogisticRegression(max_iter=1000).fit(x_train, np.repeat([0, 1], len(tr)))
    return float(clf.score(x_test, np.repeat([0, 1], len(te))))


def _relative_gap(a: np.ndarray, b: np.ndarray, owners: np.ndarray) -> float:
    match = (1.0 - np.einsum("ij,ij->i", a[owners], b, dtype=np.float64).mean()) / 2
    intra = [(1.0 - M.mean_intra_modal_cosine(m)) / 2 for m in (a, b)]
    denom = match + (intra[0] + intra[1]) / 2
    return float(match / denom) if denom > 0 else 0.0


def gap_metrics(img, txt, text_image=None, ks: Sequence[int] = (1, 5, 10), seed: int = 0) -> dict[str, float]:
    """:func:`metrics.gap_metrics` (same keys) under the COCO protocol (module docstring)."""
    a, b, owners = _unpaired(img, txt, text_image)
    if owners is None:
        return M.gap_metrics(img, txt, ks=ks, seed=seed)
    out = {
        "gap": modality_gap(a, b, owners),
        "cos_true_pairs": cos_true_pairs(a, b, owners),
        "intra_image_cos": M.mean_intra_modal_cosine(a),
        "intra_text_cos": M.mean_intra_modal_cosine(b),
        "uniformity": M.fang_of_stack(a, b),
        "separability": _separability(a, b, owners, seed),
        "relative_gap": _relative_gap(a, b, owners),
    }
    out.update(M.retrieval_recall(a, b, ks=ks, text_image=owners))
    return out


def group_metrics(img, txt, labels, text_image=None, k: Optional[int] = None, seed: int = 0) -> dict[str, float]:
    """:func:`metrics.group_metrics` (same keys) with ``labels`` per image and each caption carrying
    its image's label: the mixed set is every image and every caption."""
    a, b, owners = _unpaired(img, txt, text_image)
    if owners is None:
        return M.group_metrics(img, txt, labels, k=k, seed=seed)
    y = _labels(labels, a.shape[0])
    yt = y[owners]
    mixed, y_mixed = np.concatenate([a, b]), np.concatenate([y, yt])
    out = {f"mixed_{m}": v for m, v in M.cluster_scores(mixed, y_mixed, k=k, seed=seed).items()}
    out["mixed_knn_accuracy"] = M.knn_accuracy(mixed, y_mixed, seed=seed)
    out["mixed_linear_probe_accuracy"] = M.linear_probe_accuracy(mixed, y_mixed, seed=seed)
    for prefix, x, yx in (("image", a, y), ("text", b, yt)):
        out.update({f"{prefix}_{m}": v for m, v in M.cluster_scores(x, yx, k=k, seed=seed).items()})
    return out


def all_metrics(img, txt, labels=None, *, text_image=None, k: Optional[int] = None, ks: Sequence[int] = (1, 5, 10),
                seed: int = 0) -> dict[str, float]:
    """:func:`metrics.all_metrics` under the COCO protocol (``labels`` per image)."""
    a, b, owners = _unpaired(img, txt, text_image)
    if owners is None:
        return M.all_metrics(img, txt, labels, k=k, ks=ks, seed=seed)
    out = gap_metrics(a, b, owners, ks=ks, seed=seed)
    if labels is not None:
        out.update(M.class_retrieval_recall(a, b, labels, ks=ks, text_image=owners))
        out.update(group_metrics(a, b, labels, owners, k=k, seed=seed))
    return out
