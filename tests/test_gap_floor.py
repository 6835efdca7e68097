"""The gap's noise floor (metrics.gap_noise_floor) and its place in the evaluator's metrics."""
import numpy as np
import pytest

from openclip_structure.evaluation import metrics as M
from openclip_structure.evaluation.evaluator import evaluate_embeddings


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sphere(n, d, seed):
    return _unit(np.random.default_rng(seed).standard_normal((n, d)))


def test_floor_equals_an_explicit_permutation_computation():
    a, b = _sphere(300, 16, 0), _sphere(200, 16, 1)  # unpaired sizes (several captions per image)
    mean, std = M.gap_noise_floor(a, b, splits=50, seed=3)
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(3)
    dists = []
    for _ in range(50):
        perm = rng.permutation(500)
        dists.append(np.linalg.norm(pooled[perm[:300]].mean(0) - pooled[perm[300:]].mean(0)))
    assert mean == pytest.approx(np.mean(dists), rel=1e-9)
    assert std == pytest.approx(np.std(dists, ddof=1), rel=1e-9)


def test_floor_matches_theory_and_falls_as_one_over_sqrt_rows():
    # exchangeable unit vectors in d = 64 (trace of the covariance ~1): E|diff| ~ sqrt(1/n_a + 1/n_b)
    d = 64
    small = M.gap_noise_floor(_sphere(500, d, 0), _sphere(500, d, 1))[0]
    large = M.gap_noise_floor(_sphere(8000, d, 2), _sphere(8000, d, 3))[0]
    assert small == pytest.approx(np.sqrt(2 / 500), rel=0.05)
    assert large == pytest.approx(np.sqrt(2 / 8000), rel=0.05)
    assert small / large == pytest.approx(4.0, rel=0.08)
    # with exchangeable modalities the measured gap is of the floor's size
    gap = M.modality_gap(_sphere(500, d, 0), _sphere(500, d, 1))
    assert 0.5 * small < gap < 2 * small


def test_a_real_gap_stands_far_above_its_floor():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1000, 32))
    shift = np.zeros(32)
    shift[0] = 4.0
    img, txt = _unit(base + shift), _unit(base[::-1] + rng.standard_normal((1000, 32)) - shift)
    floor = M.gap_noise_floor(img, txt)[0]
    assert M.modality_gap(img, txt) > 10 * floor


def test_evaluator_reports_the_floor_beside_the_gap():
    img, txt = _sphere(200, 8, 0), _sphere(200, 8, 1)
    keys = list(evaluate_embeddings(img, txt)["metrics"])
    i = keys.index("gap")
    assert keys[i + 1:i + 3] == ["gap_floor", "gap_floor_std"]
    res = evaluate_embeddings(img, txt)["metrics"]
    assert res["gap_floor"] == pytest.approx(M.gap_noise_floor(img, txt)[0])
    with pytest.raises(ValueError):
        M.gap_noise_floor(img, txt[:, :4])


def test_evaluate_checkpoint_reports_floor_and_logit_scale(tmp_path):
    import math

    import open_clip
    import torch

    from openclip_structure.evaluation import evaluator as evaluate
    from openclip_structure.configs import register_model_configs
    from openclip_structure.data.sources import digits_samples
    from openclip_structure.data.writer import write_shards

    register_model_configs()
    torch.manual_seed(0)
    sd = open_clip.create_model("structure-tiny").state_dict()
    sd["logit_scale"] = torch.tensor(math.log(37.0))
    path = tmp_path / "epoch_0.pt"
    torch.save({"epoch": 0, "state_dict": sd}, path)
    shards = write_shards(digits_samples(32, 0)[:40], tmp_path / "val", num_shards=1)["pattern"]
    res = evaluate.evaluate_checkpoint("structure-tiny", str(path), shards, device="cpu")
    m = res["metrics"]
    assert m["logit_scale"] == pytest.approx(37.0, rel=1e-5)
    assert 0 < m["gap_floor"] and list(m)[list(m).index("gap") + 1] == "gap_floor"
    assert "gap_floor" in evaluate.format_metrics_table({"x": res})
