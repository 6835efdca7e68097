"""Measures of the modality gap and of group-level (semantic) structure.

All functions take embeddings as 2-D arrays ``(n_samples, dim)`` (numpy arrays or
torch tensors), validate them (2-D, finite, non-zero rows, paired inputs with the
same shape) and **L2-normalise every embedding row themselves**, so raw encoder
outputs can be passed directly. Results are plain Python floats (dicts of them
are JSON-serialisable).

Label-free measures (paired image/text embeddings, pair ``i`` is ``img[i] <-> txt[i]``):

- ``modality_gap``            centroid distance; Liang et al. 2022, "Mind the Gap:
                              Understanding the Modality Gap in Multi-modal Contrastive
                              Representation Learning" (NeurIPS 2022).
- ``gap_noise_floor``         the gap of random splits of the pooled rows: the measure's noise floor.
- ``cos_true_pairs``          mean cosine of matching pairs; Grassucci et al. 2026,
                              "Closing the Modality Gap Aligns Group-Wise Semantics" (ICLR 2026).
- ``mean_intra_modal_cosine`` mean off-diagonal cosine within one modality; Grassucci et al. 2026.
- ``fang_uniformity``         minus the W2 distance to N(0, I/d); Fang et al. 2024,
                              "Rethinking the Uniformity Metric in Self-Supervised Learning" (ICLR 2024).
- ``modality_separability``   linear image-vs-text classification accuracy; Fahim et al. 2024,
                              "It's Not a Modality Gap: Characterizing and Addressing the
                              Contrastive Gap".
- ``relative_modality_gap``   RMG; Schrodi et al. 2025, "Two Effects, One Trigger: On the
                              Modality Gap, Object Bias, and Information Imbalance in
                              Contrastive Vision-Language Models" (ICLR 2025).
- ``retrieval_recall``        R@k in both directions on the cosine matrix (standard CLIP protocol).
- ``class_retrieval_recall``  class-level R@k: any candidate of the query's class counts as a hit
                              (well posed when many captions are identical, e.g. template captions).

Group-level measures (class labels per sample), protocol of Grassucci et al. 2026:

- ``cluster_scores``          k-means -> V-measure (Rosenberg & Hirschberg 2007), NMI, ARI
                              (Hubert & Arabie 1985), homogeneity.
- ``knn_accuracy``            cross-validated cosine kNN accuracy.
- ``linear_probe_accuracy``   logistic-regression probe accuracy.
- ``group_metrics``           the above on the mixed image+text set and per modality.

The retrieval measures live in :mod:`openclip_structure.evaluation.retrieval` and the input validation in
:mod:`openclip_structure.evaluation.inputs`; both are re-exported here.

Aggregates: ``gap_metrics``, ``all_metrics``. Diagnostic: ``shift_towards``
(Liang et al. 2022 embedding shift).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    adjusted_rand_score,
    homogeneity_score,
    normalized_mutual_info_score,
    v_measure_score,
)
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from sklearn.neighbors import KNeighborsClassifier

from . import inputs as EI
from .inputs import _embeddings, _labels, _mean, _paired, _to_numpy  # noqa: F401 (shared helpers)
from .retrieval import caption_retrieval_recall, class_retrieval_recall, retrieval_recall

__all__ = [
    "modality_gap",
    "gap_noise_floor",
    "cos_true_pairs",
    "mean_intra_modal_cosine",
    "fang_uniformity",
    "modality_separability",
    "relative_modality_gap",
    "retrieval_recall",
    "class_retrieval_recall",
    "caption_retrieval_recall",
    "cluster_scores",
    "knn_accuracy",
    "linear_probe_accuracy",
    "group_metrics",
    "gap_metrics",
    "all_metrics",
    "shift_towards",
]


# ----------------------------------------------------------------------------- label-free measures


def modality_gap(img, txt) -> float:
    """Centroid gap ``|| mean_i img_i - mean_i txt_i ||_2`` on L2-normalised rows.

    Liang et al. 2022, "Mind the Gap" (NeurIPS 2022). 0 = coinciding centroids; at most 2.
    """
    a, b = _paired(img, txt)
    return float(np.linalg.norm(_mean(a) - _mean(b)))


def gap_noise_floor(img, txt, splits: int = 200, seed: int = 0) -> tuple[float, float]:
    """Noise floor of :func:`modality_gap`: (mean, std) over ``splits`` random splits of the pooled
    image + text rows into two sets of the modalities' sizes (halves when paired) of the distance
    between the two sets' centroids.

    It is the gap that a sample of this size shows when the modalities are exchangeable (the
    permutation null of the gap); it falls as ``1/sqrt(rows)``. ``img`` and ``txt`` need not be
    paired (several captions per image: every caption row counts). Rows are L2-normalised here.
    """
    a, b = _embeddings(img, "img"), _embeddings(txt, "txt")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"img and txt must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    pooled = np.concatenate([a, b]).astype(np.float64)
    n_a, total = a.shape[0], pooled.sum(axis=0)
    rng = np.random.default_rng(seed)
    dist = np.empty(splits)
    for i in range(splits):
        sum_a = pooled[rng.permutation(pooled.shape[0])[:n_a]].sum(axis=0)
        dist[i] = np.linalg.norm(sum_a / n_a - (total - sum_a) / b.shape[0])
    return float(dist.mean()), float(dist.std(ddof=1)) if splits > 1 else 0.0


def cos_true_pairs(img, txt) -> float:
    """Mean cosine of matching pairs, ``mean_i cos(img_i, txt_i)``, in [-1, 1].

    Used as "Cos True Pairs" by Grassucci et al. 2026 ("Closing the Modality Gap Aligns
    Group-Wise Semantics"). Inputs are L2-normalised here.
    """
    a, b = _paired(img, txt)
    return float(np.einsum("ij,ij->i", a, b, dtype=np.float64).mean())


def mean_intra_modal_cosine(x) -> float:
    """Mean off-diagonal cosine within one modality (Grassucci et al. 2026).

    For unit rows ``x_i``: ``mean_{i != j} <x_i, x_j> = (||sum_i x_i||^2 - N) / (N (N - 1))``,
    computed in O(N d) without the N x N matrix. Rows are L2-normalised here; needs N >= 2.
    """
    x = _embeddings(x, "x")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"x needs at least 2 rows for an off-diagonal mean, got {n}")
    s = x.sum(axis=0, dtype=np.float64)
    return float((s @ s - n) / (n * (n - 1)))


def fang_uniformity(img, txt) -> float:
    """Fang et al. uniformity: minus the W2 distance to the uniform-sphere Gaussian N(0, I/d).

    Fang et al. 2024, "Rethinking the Uniformity Metric in Self-Supervised Learning"
    (ICLR 2024). On the L2-normalised stack ``X = [img; txt]`` (2N x d), with mean ``mu``
    and biased covariance ``Sigma = (1/2N) sum_i (x_i - mu)(x_i - mu)^T`` (as the
    ModGap authors' code):

        W = sqrt( ||mu||^2 + 1 + tr(Sigma) - (2 / sqrt(d)) tr(Sigma^(1/2)) )

    and the function returns ``-W`` (higher = more uniform; 0 is the optimum, a fully
    collapsed set gives -sqrt(2)). ``tr(Sigma^(1/2))`` is the sum of the square roots of
    the eigenvalues of ``Sigma`` (``eigh``; tiny negative eigenvalues from round-off are
    clipped to 0).
    """
    a, b = _paired(img, txt)
    return fang_of_stack(a, b)


def fang_of_stack(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`fang_uniformity` of the stack ``[a; b]`` of unit rows (any row counts: several
    captions per image, :mod:`openclip_structure.evaluation.multicaption`)."""
    d = a.shape[1]
    n, m = a.shape[0], b.shape[0]
    mu = (_mean(a) + _mean(b)) / 2 if n == m else (n * _mean(a) + m * _mean(b)) / (n + m)
    sigma = np.zeros((d, d))
    rows = max(1, EI._BLOCK_ELEMENTS // (4 * d))  # float64 chunk of at most 64 MiB
    for part in (a, b):
        for start in range(0, part.shape[0], rows):
            c = part[start : start + rows].astype(np.float64) - mu
            sigma += c.T @ c
    sigma /= a.shape[0] + b.shape[0]
    eig = np.clip(np.linalg.eigvalsh(sigma), 0.0, None)
    w2 = mu @ mu + 1.0 + eig.sum() - 2.0 / np.sqrt(d) * np.sqrt(eig).sum()
    return float(-np.sqrt(max(w2, 0.0)))


def modality_separability(img, txt, seed: int = 0) -> float:
    """Accuracy of a linear classifier telling image from text embeddings (Fahim et al. 2024).

    Fahim et al. 2024, "It's Not a Modality Gap: Characterizing and Addressing the
    Contrastive Gap". ``LogisticRegression(max_iter=1000)`` (default L2, C=1) on the
    L2-normalised embeddings, label 0 = image, 1 = text. The 80/20 split is done over
    *pairs* (``random_state=seed``): both members of a held-out pair are in the test set,
    so classes are exactly balanced (stratified) and no test point has its partner in
    training. ~0.5 = no detectable gap, 1.0 = modalities linearly separable.
    """
    a, b = _paired(img, txt)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"img and txt need at least 2 pairs for a train/test split, got {n}")
    train, test = train_test_split(np.arange(n), test_size=0.2, random_state=seed)
    x_train = np.concatenate([a[train], b[train]])
    y_train = np.repeat([0, 1], len(train))
    x_test = np.concatenate([a[test], b[test]])
    y_test = np.repeat([0, 1], len(test))
    clf = LogisticRegression(max_iter=1000).fit(x_train, y_train)
    return float(clf.score(x_test, y_test))


def relative_modality_gap(img, txt) -> float:
    """Relative modality gap (RMG) of Schrodi et al. 2025 ("Two Effects, One Trigger", ICLR 2025).

    With the cosine dissimilarity ``d(u, v) = (1 - cos(u, v)) / 2`` in [0, 1]:

        M   = (1/N) sum_i d(img_i, txt_i)                         # matching pairs
        I_m = (1/(N(N-1))) sum_{i != j} d(m_i, m_j),  m in {img, txt}
        RMG = M / ( M + (I_img + I_txt) / 2 )

    i.e. the paired cross-modal distance relative to the spread inside each modality;
    0 = matching pairs coincide, close to 1 = pairs far apart compared with the
    modalities' own spread. This follows the authors' reference code
    (lmb-freiburg/two-effects-one-trigger, ``analysis/gap_precompute.py::compute_rmg``)
    for one caption per image, except that their floor ``M >= 1e-3`` is not applied
    (identical modalities give exactly 0 here). Computed in O(N d); needs N >= 2.
    Returns 0.0 when the denominator is 0 (all embeddings identical).
    """
    a, b = _paired(img, txt)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"img and txt need at least 2 pairs for intra-modal distances, got {n}")
    match = (1.0 - np.einsum("ij,ij->i", a, b, dtype=np.float64).mean()) / 2
    intra = [(1.0 - mean_intra_modal_cosine(m)) / 2 for m in (a, b)]
    denom = match + (intra[0] + intra[1]) / 2
    return float(match / denom) if denom > 0 else 0.0


# ----------------------------------------------------------------------------- group-level measures


def cluster_scores(emb, labels, k: int | None = None, seed: int = 0, n_init: int = 10) -> dict[str, float]:
    """k-means clustering of L2-normalised embeddings scored against class labels.

    ``KMeans(n_clusters=k, random_state=seed, n_init=n_init)`` (best of ``n_init`` k-means++
    restarts); k defaults to the number of distinct labels. Returns ``v_measure``
    (Rosenberg & Hirschberg 2007; headline metric of Grassucci et al. 2026), ``nmi``,
    ``ari`` (Hubert & Arabie 1985) and ``homogeneity``.
    """
    x = _embeddings(emb, "emb")
    y = _labels(labels, x.shape[0])
    k = int(np.unique(y).size) if k is None else int(k)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be between 1 and the number of samples ({x.shape[0]}), got {k}")
    pred = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(x)
    return {
        "v_measure": float(v_measure_score(y, pred)),
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "ari": float(adjusted_rand_score(y, pred)),
        "homogeneity": float(homogeneity_score(y, pred)),
    }


def knn_accuracy(emb, labels, k: int = 5, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated k-nearest-neighbour accuracy with cosine distance.

    ``KNeighborsClassifier(n_neighbors=k, metric="cosine")`` on L2-normalised rows,
    mean accuracy over ``StratifiedKFold(folds, shuffle=True, random_state=seed)``
    (Grassucci et al. 2026 report k = 5).
    """
    x = _embeddings(emb, "emb")
    y = _labels(labels, x.shape[0])
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    return float(cross_val_score(clf, x, y, cv=cv).mean())


def linear_probe_accuracy(emb, labels, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe on L2-normalised embeddings.

    ``LogisticRegression(max_iter=1000)`` trained on a stratified 80/20 split
    (``random_state=seed``); the split falls back to unstratified if some class has
    fewer than 2 samples.
    """
    x = _embeddings(emb, "emb")
    y = _labels(labels, x.shape[0])
    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 else None
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=stratify)
    clf = LogisticRegression(max_iter=1000).fit(x_tr, y_tr)
    return float(clf.score(x_te, y_te))


def group_metrics(img, txt, labels, k: int | None = None, seed: int = 0) -> dict[str, float]:
    """Group-level structure of paired embeddings (protocol of Grassucci et al. 2026).

    The L2-normalised image AND text embeddings are stacked into one mixed set of 2N
    points with the labels duplicated. Returns a flat dict:
    ``mixed_{v_measure,nmi,ari,homogeneity}`` (k-means on the mixed set),
    ``mixed_knn_accuracy`` (k = 5, 5 folds), ``mixed_linear_probe_accuracy``, and the
    clustering scores of each modality alone, ``image_*`` and ``text_*``. A modality gap
    shows up as mixed scores far below the per-modality ones.
    """
    a, b = _paired(img, txt)
    y = _labels(labels, a.shape[0])
    mixed, y_mixed = np.concatenate([a, b]), np.concatenate([y, y])
    out = {f"mixed_{m}": v for m, v in cluster_scores(mixed, y_mixed, k=k, seed=seed).items()}
    out["mixed_knn_accuracy"] = knn_accuracy(mixed, y_mixed, seed=seed)
    out["mixed_linear_probe_accuracy"] = linear_probe_accuracy(mixed, y_mixed, seed=seed)
    for prefix, x in (("image", a), ("text", b)):
        out.update({f"{prefix}_{m}": v for m, v in cluster_scores(x, y, k=k, seed=seed).items()})
    return out


# ----------------------------------------------------------------------------- aggregates


def gap_metrics(img, txt, ks: Sequence[int] = (1, 5, 10), seed: int = 0) -> dict[str, float]:
    """All label-free measures as a flat dict of floats.

    Keys: ``gap``, ``cos_true_pairs``, ``intra_image_cos``, ``intra_text_cos``,
    ``uniformity`` (Fang, higher = more uniform), ``separability``, ``relative_gap``
    and ``i2t_r{k}`` / ``t2i_r{k}`` for k in ``ks``.
    """
    a, b = _paired(img, txt)
    out = {
        "gap": modality_gap(a, b),
        "cos_true_pairs": cos_true_pairs(a, b),
        "intra_image_cos": mean_intra_modal_cosine(a),
        "intra_text_cos": mean_intra_modal_cosine(b),
        "uniformity": fang_uniformity(a, b),
        "separability": modality_separability(a, b, seed=seed),
        "relative_gap": relative_modality_gap(a, b),
    }
    out.update(retrieval_recall(a, b, ks=ks))
    return out


def all_metrics(img, txt, labels=None, *, k: int | None = None, ks: Sequence[int] = (1, 5, 10),
                seed: int = 0) -> dict[str, float]:
    """``gap_metrics`` plus, when ``labels`` are given, ``class_retrieval_recall`` and
    ``group_metrics`` (one flat dict)."""
    out = gap_metrics(img, txt, ks=ks, seed=seed)
    if labels is not None:
        out.update(class_retrieval_recall(img, txt, labels, ks=ks))
        out.update(group_metrics(img, txt, labels, k=k, seed=seed))
    return out


# ----------------------------------------------------------------------------- diagnostics


def shift_towards(img, txt, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Shift both modalities along the gap vector (Liang et al. 2022 "Mind the Gap", Sec. 4).

    With ``delta = mean_i txt_i - mean_i img_i`` computed on the L2-normalised inputs:

        img'_i = normalize(img_i + (alpha / 2) * delta)
        txt'_i = normalize(txt_i - (alpha / 2) * delta)

    ``alpha = 0`` leaves the embeddings unchanged (apart from normalisation), ``alpha = 1``
    moves both centroids to their midpoint, i.e. closes the centroid gap exactly before
    the re-normalisation (after it the gap is ~0, exactly 0 when the shifted norms are
    equal), ``alpha < 0`` widens the gap. Returns the re-normalised ``(img', txt')``. The rows
    need not be pairs (several captions per image: the centroid of all captions).
    """
    a, b = _embeddings(img, "img"), _embeddings(txt, "txt")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"img and txt must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    half = (alpha / 2) * (_mean(b) - _mean(a))
    a = a + half.astype(a.dtype)
    b = b - half.astype(b.dtype)
    tiny = np.finfo(a.dtype).tiny
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), tiny)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), tiny)
    return a, b
