"""Per-term structural diagnostics (openclip_structure.evaluation.diagnostics) against plain loops, and in the
evaluator with a checkpoint that carries separation heads."""
import json

import numpy as np
import pytest
import torch

from openclip_structure.evaluation import diagnostics as D
from openclip_structure.evaluation import evaluator as evaluate
from openclip_structure.evaluation import inputs as EI
from openclip_structure.evaluation import metrics as M
from openclip_structure.views.heads import heads_path
from openclip_structure.data.sources import digits_samples
from openclip_structure.data.writer import write_shards

MODEL = "structure-tiny"


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rand(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d))


def test_gc_discrepancies_match_double_loop():
    img, txt = _rand(12, 5, 0), _rand(12, 5, 1)
    v, t = _unit(img), _unit(txt)
    cross = inmodal = 0.0
    for j in range(12):
        for k in range(12):
            if j != k:
                cross += abs(v[j] @ t[k] - v[k] @ t[j])
                inmodal += abs(v[j] @ v[k] - t[j] @ t[k])
    out = D.gc_discrepancies(img, txt)
    assert out["gc_cross_asym"] == pytest.approx(cross / 132, rel=1e-6)
    assert out["gc_inmodal_diff"] == pytest.approx(inmodal / 132, rel=1e-6)


def test_gc_discrepancies_zero_for_identical_modalities_and_blocked(monkeypatch):
    x = _rand(30, 6, 2)
    assert D.gc_discrepancies(x, x) == {"gc_cross_asym": pytest.approx(0, abs=1e-7),
                                        "gc_inmodal_diff": pytest.approx(0, abs=1e-7)}
    img, txt = _rand(30, 6, 3), _rand(30, 6, 4)
    full = D.gc_discrepancies(img, txt)
    monkeypatch.setattr(EI, "_BLOCK_ELEMENTS", 4 * 30)  # 4 rows a block
    assert D.gc_discrepancies(img, txt) == pytest.approx(full, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        D.gc_discrepancies(img[:1], txt[:1])


def test_bridge_distances_match_loop():
    img, txt, aug = _rand(9, 4, 5), _rand(9, 4, 6), _rand(9, 4, 7)
    v, t, a = _unit(img), _unit(txt), _unit(aug)
    want_bridge, want_view = [], []
    for j in range(9):
        mu = 0.25 * v[j] + 0.75 * t[j]
        mu = mu / np.linalg.norm(mu)
        want_bridge.append(np.linalg.norm(a[j] - mu))
        want_view.append(np.linalg.norm(a[j] - v[j]))
    out = D.bridge_distances(img, txt, aug)
    assert out["bridge_distance"] == pytest.approx(np.mean(want_bridge), rel=1e-6)
    assert out["aug_view_distance"] == pytest.approx(np.mean(want_view), rel=1e-6)
    # an augmented view ON the bridge point has distance 0
    on_bridge = _unit(0.25 * v + 0.75 * t)
    assert D.bridge_distances(img, txt, on_bridge)["bridge_distance"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="shape of img"):
        D.bridge_distances(img, txt, aug[:3])


def test_separation_measures_match_loops():
    rng = np.random.default_rng(8)
    z, zi = rng.standard_normal((40, 3)), rng.standard_normal((40, 3))
    labels = np.repeat(np.arange(4), 10)
    out = D.separation_measures(z, zi, labels, "image")
    u, ui = _unit(z), _unit(zi)
    assert out["sep_image_shared_ind_cos2"] == pytest.approx(np.mean([(u[j] @ ui[j]) ** 2 for j in range(40)]))
    corrs = [abs(np.corrcoef(u[:, p], ui[:, q])[0, 1]) for p in range(3) for q in range(3)]
    assert out["sep_image_shared_ind_abs_corr"] == pytest.approx(np.mean(corrs), rel=1e-6)
    assert out["sep_image_ind_probe_accuracy"] == M.linear_probe_accuracy(zi, labels)
    # independent = shared: cos^2 = 1 and the diagonal correlations are 1
    same = D.separation_measures(z, z, None, "text")
    assert same["sep_text_shared_ind_cos2"] == pytest.approx(1.0) and "sep_text_ind_probe_accuracy" not in same


@pytest.fixture(scope="module")
def ckpt_with_heads(tmp_path_factory):
    """A random tiny model whose separation heads are its own shared projections (independent
    features = shared features, so the measures are known), saved as a training checkpoint."""
    import open_clip

    from openclip_structure.views.heads import HEADS_KEY, attach_heads, heads_state
    from openclip_structure.main import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    heads = attach_heads(model, MODEL)
    with torch.no_grad():
        heads["image"].proj.copy_(model.visual.proj)
        heads["text"].proj.copy_(model.text_projection)
    path = tmp_path_factory.mktemp("sep") / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict(), HEADS_KEY: heads_state(heads)}, path)
    return path


def test_evaluator_diagnostics_with_heads(ckpt_with_heads, tmp_path, capsys):
    shards = write_shards(digits_samples(32, 0)[:60], tmp_path / "val", num_shards=1)["pattern"]
    argv = ["--model", MODEL, "--pretrained", str(ckpt_with_heads), "--data", shards, "--device", "cpu",
            "--diagnostics", "--batch-size", "16", "--out", str(tmp_path / "r.json")]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r.json").read_text())["checkpoints"]["epoch_1"]
    m = res["metrics"]
    assert res["separation_heads"] is True
    for modality in ("image", "text"):  # the heads equal the shared projections
        assert m[f"sep_{modality}_shared_ind_cos2"] == pytest.approx(1.0, abs=1e-5)
        assert m[f"sep_{modality}_ind_probe_accuracy"] == pytest.approx(m[f"sep_{modality}_shared_probe_accuracy"])
    model, preprocess, tok = evaluate.load_model(MODEL, str(ckpt_with_heads), "cpu")
    img, txt, labels = evaluate.encode_shards(model, preprocess, tok, shards)
    assert m["gc_cross_asym"] == pytest.approx(D.gc_discrepancies(img, txt)["gc_cross_asym"], rel=1e-5)
    # the augmented view is seeded: the same seed gives the same views, another seed others
    a = D.encode_structure_views(model, preprocess, tok, shards, seed=0)["img_aug"]
    b = D.encode_structure_views(model, preprocess, tok, shards, seed=0, batch_size=7)["img_aug"]
    c = D.encode_structure_views(model, preprocess, tok, shards, seed=1)["img_aug"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - c).max() > 1e-3
    assert m["bridge_distance"] == pytest.approx(D.bridge_distances(img, txt, a)["bridge_distance"], rel=1e-5)
    # the launcher's layout: the heads in their own file beside the checkpoint (same numbers)
    saved = torch.load(ckpt_with_heads, weights_only=True)
    heads_sd = saved.pop("structure_heads")
    (tmp_path / "run").mkdir()
    torch.save(saved, tmp_path / "run" / "epoch_1.pt")
    torch.save(heads_sd, heads_path(str(tmp_path / "run"), 1))
    beside = evaluate.evaluate_checkpoint(MODEL, str(tmp_path / "run" / "epoch_1.pt"), shards, device="cpu",
                                          diagnostics=True)
    assert beside["separation_heads"] is True
    assert beside["metrics"]["sep_image_shared_ind_cos2"] == pytest.approx(m["sep_image_shared_ind_cos2"])
    # a checkpoint without heads: no sep_* keys, the rest still there
    torch.save(saved, tmp_path / "plain.pt")
    res = evaluate.evaluate_checkpoint(MODEL, str(tmp_path / "plain.pt"), shards, device="cpu", diagnostics=True)
    assert res["separation_heads"] is False and "bridge_distance" in res["metrics"]
    assert not any(k.startswith("sep_") for k in res["metrics"])
