import json

import numpy as np
import pytest
import scipy.linalg
import torch

from openclip_structure.evaluation import inputs as EI
from openclip_structure.evaluation import metrics as M


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rand(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d))


def _labelled_toy(n_per_class=30, n_classes=4, d=16, offset=2.0, noise=0.05, seed=0):
    """Classes at e_0..e_{C-1}; image gets +offset*e_{d-1}, text +offset*e_{d-2}.

    After normalisation the modality offset (distance ~1.26) is larger than the class
    separation (~0.63), so k-means on the mixed set splits by modality first.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    centres = np.eye(d)[labels]
    img = centres + offset * np.eye(d)[d - 1] + noise * rng.standard_normal((len(labels), d))
    txt = centres + offset * np.eye(d)[d - 2] + noise * rng.standard_normal((len(labels), d))
    return img, txt, labels


# ----------------------------------------------------------------------------- gap measures


def test_identical_modalities():
    x = _rand(400, 8, 0)
    assert M.modality_gap(x, x) == pytest.approx(0.0, abs=1e-6)
    assert M.cos_true_pairs(x, x) == pytest.approx(1.0, abs=1e-6)
    assert M.relative_modality_gap(x, x) == pytest.approx(0.0, abs=1e-6)
    assert abs(M.modality_separability(x, x) - 0.5) <= 0.1
    r = M.retrieval_recall(x, x)
    assert all(v == 1.0 for v in r.values())


def test_gap_of_two_clouds_is_analytic():
    # Rows cos(t) e1 +- sin(t) w with w orthogonal to e1, e2: the symmetric +-w terms cancel,
    # so mean(img) = mean(cos t) e1, mean(txt) = mean(cos s) e2 and gap = sqrt(ci^2 + ct^2).
    rng = np.random.default_rng(1)
    n, d = 100, 10
    w = _unit(rng.standard_normal((n, d - 2)))
    w = np.concatenate([np.zeros((n, 2)), w], axis=1)
    t, s = rng.uniform(0.0, 0.6, n), rng.uniform(0.0, 0.6, n)
    e1, e2 = np.eye(d)[0], np.eye(d)[1]
    img = np.concatenate([np.cos(t)[:, None] * e1 + np.sin(t)[:, None] * w,
                          np.cos(t)[:, None] * e1 - np.sin(t)[:, None] * w])
    txt = np.concatenate([np.cos(s)[:, None] * e2 + np.sin(s)[:, None] * w,
                          np.cos(s)[:, None] * e2 - np.sin(s)[:, None] * w])
    expected = np.hypot(np.cos(t).mean(), np.cos(s).mean())
    assert M.modality_gap(img, txt) == pytest.approx(expected, rel=1e-9)
    assert expected < 1.35  # really spread, not just sqrt(2)


def test_gap_of_tight_clouds_is_sqrt2():
    rng = np.random.default_rng(2)
    n, d = 300, 8
    img = np.eye(d)[0] + 1e-3 * rng.standard_normal((n, d))
    txt = 5.0 * (np.eye(d)[1] + 1e-3 * rng.standard_normal((n, d)))  # scale is normalised away
    assert M.modality_gap(img, txt) == pytest.approx(np.sqrt(2), abs=1e-3)
    assert M.cos_true_pairs(img, txt) == pytest.approx(0.0, abs=1e-2)
    assert M.modality_separability(img, txt) == 1.0
    assert M.relative_modality_gap(img, txt) == pytest.approx(1.0, abs=1e-3)
    assert M.fang_uniformity(img, txt) < -1.0  # two points on the sphere: far from uniform


def test_mean_intra_modal_cosine_matches_double_loop():
    x = _rand(25, 6, 3) + 0.5
    u = _unit(x)
    n = len(u)
    brute = sum(u[i] @ u[j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert M.mean_intra_modal_cosine(x) == pytest.approx(brute, abs=1e-6)


def test_relative_modality_gap_matches_definition():
    img, txt = _rand(20, 5, 4) + 0.3, _rand(20, 5, 5) - 0.3
    a, b = _unit(img), _unit(txt)
    n = len(a)

    def dis(u, v):
        return (1 - u @ v) / 2

    match = np.mean([dis(a[i], b[i]) for i in range(n)])
    intra = sum(dis(m[i], m[j]) for m in (a, b) for i in range(n) for j in range(n) if i != j)
    expected = match / (match + intra / (2 * n * (n - 1)))
    assert M.relative_modality_gap(img, txt) == pytest.approx(expected, abs=1e-6)


def test_fang_uniformity_matches_scipy_sqrtm():
    img, txt = _rand(60, 7, 6) + 1.0, _rand(60, 7, 7)
    x = np.concatenate([_unit(img), _unit(txt)])
    mu = x.mean(0)
    sigma = np.cov(x.T, bias=True)
    d = x.shape[1]
    w2 = mu @ mu + 1 + np.trace(sigma) - 2 / np.sqrt(d) * np.trace(scipy.linalg.sqrtm(sigma)).real
    assert M.fang_uniformity(img, txt) == pytest.approx(-np.sqrt(w2), abs=1e-6)


def test_fang_uniformity_uniform_vs_collapsed():
    d = 16
    uniform = _rand(20000, d, 8)  # Gaussian directions = uniform on the sphere
    assert M.fang_uniformity(uniform[:10000], uniform[10000:]) > -0.05
    collapsed = np.ones((100, d)) + 1e-4 * _rand(100, d, 9)
    assert M.fang_uniformity(collapsed, collapsed) < -1.3  # -sqrt(2) for a single point


def test_retrieval_recall_matches_brute_force():
    img, txt = _rand(40, 6, 10), _rand(40, 6, 11)
    s = _unit(img) @ _unit(txt).T
    r = M.retrieval_recall(img, txt, ks=(1, 5, 10))
    for name, mat in (("i2t", s), ("t2i", s.T)):
        ranks = [list(np.argsort(-mat[i])).index(i) for i in range(len(mat))]
        for k in (1, 5, 10):
            assert r[f"{name}_r{k}"] == pytest.approx(np.mean(np.array(ranks) < k))
    assert set(r) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert 0 < r["i2t_r10"] < 1  # the random case is non-trivial


def test_retrieval_recall_blocked(monkeypatch):
    monkeypatch.setattr(EI, "_BLOCK_ELEMENTS", 50)  # force many small row blocks
    img, txt = _rand(40, 6, 12), _rand(40, 6, 13)
    blocked = M.retrieval_recall(img, txt)
    monkeypatch.undo()
    assert blocked == M.retrieval_recall(img, txt)


# ----------------------------------------------------------------------------- group measures


def test_separable_clusters_are_perfect():
    img, _, labels = _labelled_toy(offset=0.0)
    s = M.cluster_scores(img, labels)
    assert s == pytest.approx({"v_measure": 1.0, "nmi": 1.0, "ari": 1.0, "homogeneity": 1.0})
    assert M.knn_accuracy(img, labels) == 1.0
    assert M.linear_probe_accuracy(img, labels) == 1.0


def test_cluster_scores_random_labels_are_low():
    x = _rand(200, 8, 14)
    labels = np.random.default_rng(15).integers(0, 4, 200)
    assert M.cluster_scores(x, labels)["v_measure"] < 0.2


def test_gap_ruins_mixed_clustering_and_shift_restores_it():
    img, txt, labels = _labelled_toy()
    before = M.group_metrics(img, txt, labels)
    assert before["image_v_measure"] > 0.99
    assert before["text_v_measure"] > 0.99
    assert before["mixed_v_measure"] < 0.7  # k-means splits by modality first
    assert M.modality_gap(img, txt) > 1.0

    img_s, txt_s = M.shift_towards(img, txt, alpha=1.0)
    np.testing.assert_allclose(np.linalg.norm(img_s, axis=1), 1.0, rtol=1e-6)
    assert M.modality_gap(img_s, txt_s) < 0.02
    after = M.group_metrics(img_s, txt_s, labels)
    assert after["mixed_v_measure"] > 0.99
    assert after["mixed_knn_accuracy"] == 1.0

    img_0, txt_0 = M.shift_towards(img, txt, alpha=0.0)
    np.testing.assert_allclose(img_0, _unit(img), atol=1e-12)
    assert M.modality_gap(*M.shift_towards(img, txt, alpha=-0.5)) > M.modality_gap(img, txt)


def test_group_metrics_keys_and_k():
    img, txt, labels = _labelled_toy(n_per_class=10)
    g = M.group_metrics(img, txt, labels, k=8)  # 8 clusters = one per (class, modality)
    expected = {f"{p}_{m}" for p in ("mixed", "image", "text") for m in ("v_measure", "nmi", "ari", "homogeneity")}
    assert set(g) == expected | {"mixed_knn_accuracy", "mixed_linear_probe_accuracy"}
    assert g["mixed_homogeneity"] > 0.99


def test_all_metrics_json_and_torch_input():
    img, txt, labels = _labelled_toy(n_per_class=10)
    out = M.all_metrics(torch.from_numpy(img).float(), torch.from_numpy(txt), labels=torch.from_numpy(labels))
    json.dumps(out)
    assert all(type(v) is float for v in out.values())
    assert set(M.gap_metrics(img, txt)) <= set(out)
    assert "mixed_v_measure" in out and "mixed_v_measure" not in M.all_metrics(img, txt)
    assert out["gap"] == pytest.approx(M.modality_gap(img, txt), abs=1e-6)


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "img, txt, match",
    [
        (np.full((4, 3), np.nan), np.ones((4, 3)), "img"),
        (np.ones((4, 3)), np.array([[1.0, np.inf, 0]] * 4), "txt"),
        (np.ones(3), np.ones((4, 3)), "img must be 2-D"),
        (np.ones((4, 3)), np.ones((4, 3, 1)), "txt must be 2-D"),
        (np.ones((4, 3)), np.ones((5, 3)), "same number of rows"),
        (np.ones((4, 3)), np.ones((4, 2)), "same dimension"),
        (np.zeros((4, 3)), np.ones((4, 3)), "img contains a zero-norm row"),
        (np.array([["a"] * 3] * 4), np.ones((4, 3)), "img must be a real numeric"),
    ],
)
def test_bad_paired_input(img, txt, match):
    for fn in (M.modality_gap, M.cos_true_pairs, M.fang_uniformity, M.relative_modality_gap,
               M.retrieval_recall, M.gap_metrics):
        with pytest.raises(ValueError, match=match):
            fn(img, txt)


def test_bad_single_and_label_input():
    with pytest.raises(ValueError, match="x needs at least 2 rows"):
        M.mean_intra_modal_cosine(np.ones((1, 3)))
    with pytest.raises(ValueError, match="emb contains NaN"):
        M.cluster_scores(np.array([[1.0, np.nan]] * 4), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels must have one entry"):
        M.knn_accuracy(np.eye(4), [0, 1, 0])
    with pytest.raises(ValueError, match="labels must be 1-D"):
        M.group_metrics(np.eye(4), np.eye(4), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="k must be"):
        M.cluster_scores(np.eye(4), [0, 1, 0, 1], k=5)
    with pytest.raises(ValueError, match="ks must be"):
        M.retrieval_recall(np.eye(4), np.eye(4), ks=(0,))
