"""Several captions per image, the COCO protocol: every caption is its own text; i2t R@k counts any
caption of the image, t2i R@k is scored per caption; gap and group measures use every caption,
each carrying its image's label. Checked against plain loops, and single-caption data gives
exactly the paired numbers."""
import numpy as np
import pytest

from openclip_structure.evaluation import inputs as EI
from openclip_structure.evaluation import metrics as M
from openclip_structure.evaluation import multicaption as MC


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _toy(n_img=30, d=8, seed=0, max_caps=4):
    """Images and 1..max_caps captions each (caption = its image + noise), owners shuffled."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, d))
    counts = rng.integers(1, max_caps + 1, size=n_img)
    owners = rng.permutation(np.repeat(np.arange(n_img), counts))
    txt = img[owners] + 1.2 * rng.standard_normal((len(owners), d))
    return img, txt, owners


def _loop_recall(img, txt, owners, ks):
    """COCO protocol written out: sort every row of the cosine matrix, look for a positive."""
    a, b = _unit(img), _unit(txt)
    s = a @ b.T
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = np.mean([any(owners[j] == i for j in np.argsort(-s[i])[:k]) for i in range(len(a))])
        out[f"t2i_r{k}"] = np.mean([owners[j] in np.argsort(-s[:, j])[:k] for j in range(len(b))])
    return out


def test_recall_any_caption_for_images_and_per_caption_for_texts():
    img, txt, owners = _toy()
    got = M.retrieval_recall(img, txt, ks=(1, 3, 5), text_image=owners)
    want = _loop_recall(img, txt, owners, (1, 3, 5))
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["i2t_r1"] < 1 and 0 < got["t2i_r1"] < 1  # non-trivial
    assert got["i2t_r1"] != got["t2i_r1"]  # averaged over images vs over captions


def test_recall_blocked(monkeypatch):
    img, txt, owners = _toy(seed=1)
    whole = M.retrieval_recall(img, txt, text_image=owners)
    cap = [f"c{o % 7}" for o in owners]
    whole_cap = M.caption_retrieval_recall(img, txt, cap, text_image=owners)
    monkeypatch.setattr(EI, "_BLOCK_ELEMENTS", 40)
    assert M.retrieval_recall(img, txt, text_image=owners) == whole
    assert M.caption_retrieval_recall(img, txt, cap, text_image=owners) == whole_cap


def test_class_and_caption_recall_against_loops():
    img, txt, owners = _toy(seed=2)
    labels = np.arange(len(img)) % 4
    captions = [f"text {o % 9}" for o in owners]  # repeated texts across images
    a, b = _unit(img), _unit(txt)
    s = a @ b.T
    cls = M.class_retrieval_recall(img, txt, labels, ks=(1, 2), text_image=owners)
    cap = M.caption_retrieval_recall(img, txt, captions, ks=(1, 2), text_image=owners)
    for k in (1, 2):
        i2t = np.mean([any(labels[owners[j]] == labels[i] for j in np.argsort(-s[i])[:k]) for i in range(len(a))])
        t2i = np.mean([any(labels[i] == labels[owners[j]] for i in np.argsort(-s[:, j])[:k]) for j in range(len(b))])
        assert (cls[f"i2t_class_r{k}"], cls[f"t2i_class_r{k}"]) == pytest.approx((i2t, t2i))
        mine = [{captions[j] for j in range(len(b)) if owners[j] == i} for i in range(len(a))]
        i2t = np.mean([any(captions[j] in mine[i] for j in np.argsort(-s[i])[:k]) for i in range(len(a))])
        t2i = np.mean([any(captions[j] in mine[i] for i in np.argsort(-s[:, j])[:k]) for j in range(len(b))])
        assert (cap[f"i2t_caption_r{k}"], cap[f"t2i_caption_r{k}"]) == pytest.approx((i2t, t2i))


def test_gap_and_pair_measures_against_definitions():
    img, txt, owners = _toy(seed=3)
    out = MC.gap_metrics(img, txt, owners, ks=(1,))
    a, b = _unit(img), _unit(txt)
    assert out["gap"] == pytest.approx(np.linalg.norm(a.mean(0) - b.mean(0)), abs=1e-6)
    assert out["cos_true_pairs"] == pytest.approx(np.mean([a[owners[j]] @ b[j] for j in range(len(b))]), abs=1e-6)
    offdiag = lambda x: (np.sum(x @ x.T) - len(x)) / (len(x) * (len(x) - 1))  # noqa: E731
    assert out["intra_image_cos"] == pytest.approx(offdiag(a), abs=1e-6)
    assert out["intra_text_cos"] == pytest.approx(offdiag(b), abs=1e-6)
    match = np.mean([(1 - a[owners[j]] @ b[j]) / 2 for j in range(len(b))])
    rmg = match / (match + ((1 - offdiag(a)) / 2 + (1 - offdiag(b)) / 2) / 2)
    assert out["relative_gap"] == pytest.approx(rmg, abs=1e-6)
    # Fang on the stacked set of every image and every caption, from its covariance's square root
    import scipy.linalg
    x = np.concatenate([a, b]).astype(np.float64)
    mu, sigma = x.mean(0), np.cov(x.T, bias=True)
    w2 = mu @ mu + 1 + np.trace(sigma) - 2 / np.sqrt(x.shape[1]) * np.trace(scipy.linalg.sqrtm(sigma).real)
    assert out["uniformity"] == pytest.approx(-np.sqrt(w2), abs=1e-5)
    assert 0.0 <= out["separability"] <= 1.0


def test_separability_splits_over_images_with_balanced_classes():
    """Captions that copy their image exactly: no direction separates images from captions,
    so a balanced test set gives 0.5 (an unbalanced one would give the caption share)."""
    rng = np.random.default_rng(4)
    img = rng.standard_normal((40, 6))
    owners = np.repeat(np.arange(40), 3)
    assert MC.gap_metrics(img, img[owners], owners)["separability"] == pytest.approx(0.5)
    shift = 4 * np.eye(6)[0]  # captions on the other side of a plane: separable
    assert MC.gap_metrics(img + shift, img[owners] - shift, owners)["separability"] == 1.0


def test_group_metrics_each_caption_carries_its_images_label():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), 12)
    img = np.eye(6)[labels] * 3 + 0.1 * rng.standard_normal((36, 6))
    owners = np.repeat(np.arange(36), 2)
    txt = np.eye(6)[labels[owners] + 3] * 3 + 0.1 * rng.standard_normal((72, 6))  # own class, own modality
    out = MC.group_metrics(img, txt, labels, owners)
    assert out["image_v_measure"] == pytest.approx(1.0) and out["text_v_measure"] == pytest.approx(1.0)
    assert out["mixed_knn_accuracy"] == pytest.approx(1.0)
    assert out["mixed_v_measure"] < 0.9  # the modalities are orthogonal: the mixed set splits by modality
    near = np.eye(6)[labels[owners]] * 3 + 0.1 * rng.standard_normal((72, 6))  # captions at their class
    same = MC.all_metrics(img, near, labels, text_image=owners)
    assert same["mixed_v_measure"] == pytest.approx(1.0)
    assert same["i2t_class_r1"] == same["t2i_class_r1"] == 1.0
    shuffled = MC.all_metrics(img, near, labels, text_image=np.roll(owners, 24))  # captions of other classes
    assert shuffled["t2i_class_r1"] == 0.0


def test_single_caption_gives_exactly_the_paired_numbers():
    rng = np.random.default_rng(6)
    labels = np.repeat(np.arange(4), 10)
    img = np.eye(8)[labels] + 0.5 * rng.standard_normal((40, 8))
    txt = np.eye(8)[labels] + 0.5 * rng.standard_normal((40, 8))
    ident = np.arange(40)
    assert MC.all_metrics(img, txt, labels, text_image=ident) == M.all_metrics(img, txt, labels)
    assert MC.all_metrics(img, txt, labels) == M.all_metrics(img, txt, labels)
    caps = [f"c{i % 13}" for i in range(40)]
    assert M.caption_retrieval_recall(img, txt, caps, text_image=ident) == M.caption_retrieval_recall(img, txt, caps)


def test_first_captions():
    assert MC.first_captions([2, 0, 2, 1, 0], 3).tolist() == [1, 3, 0]
    with pytest.raises(ValueError, match="image row 1 has no caption"):
        MC.first_captions([0, 2], 3)


@pytest.mark.parametrize("owners, match", [
    ([0, 1, 1], "one entry per caption row"),
    ([0, 1, 5, 1], r"image rows in \[0, 3\)"),
    ([0, 1, 1, 1], "1 image\\(s\\) have no caption"),
    ([0.0, 1.0, 2.0, 1.0], "integer image rows"),
])
def test_bad_text_image(owners, match):
    img, txt = np.eye(3, 4) + 0.1, np.ones((4, 4))
    with pytest.raises(ValueError, match=match):
        M.retrieval_recall(img, txt, text_image=np.array(owners))
    with pytest.raises(ValueError, match="same number of rows"):
        MC.gap_metrics(img, txt)


# ----------------------------------------------------------------------------- the evaluator


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    import open_clip
    import torch

    from openclip_structure.main import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "epoch_0.pt"
    torch.save({"epoch": 0, "state_dict": open_clip.create_model("structure-tiny").state_dict()}, path)
    return str(path)


@pytest.mark.slow
def test_evaluator_scores_every_caption(random_checkpoint, tmp_path):
    """Multi-caption shards: every line is its own text (num_texts), retrieval and gap measures equal a
    plain loop over embeddings computed here caption by caption; single-caption shards give exactly
    the paired measures, num_texts == num_samples."""
    import json
    import torch

    from openclip_structure.data.reader import _decode_image
    from openclip_structure.evaluation import evaluator as evaluate
    from openclip_structure.data.reader import Sample
    from openclip_structure.data.sources import digits_samples
    from openclip_structure.data.writer import write_shards

    base = digits_samples()[:60]
    lines = [[f"{s.caption}, picture {i}", f"the digit {s.label}, image {i}", f"picture {i}"][: 1 + i % 3]
             for i, s in enumerate(base)]
    multi = write_shards([Sample(s.key, s.image, "\n".join(c), s.label) for s, c in zip(base, lines)],
                         tmp_path / "multi", num_shards=2)["pattern"]
    assert evaluate.main(["--model", "structure-tiny", "--pretrained", random_checkpoint, "--data", multi,
                          "--out", str(tmp_path / "res.json")]) == 0
    res = next(iter(json.loads((tmp_path / "res.json").read_text())["checkpoints"].values()))
    assert (res["num_samples"], res["num_texts"]) == (60, 120)
    model, preprocess, tok = evaluate.load_model("structure-tiny", random_checkpoint, "cpu")
    with torch.no_grad():
        img = np.stack([model.encode_image(preprocess(_decode_image(s.key, s.image))[None],
                                           normalize=True)[0].numpy() for s in base])
        caps = [(i, c) for i, cs in enumerate(lines) for c in cs]
        txt = np.stack([model.encode_text(tok([c]), normalize=True)[0].numpy() for _, c in caps])
    owners = np.array([i for i, _ in caps])
    want = _loop_recall(img, txt, owners, (1, 5, 10))
    for key, value in want.items():
        assert res["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert res["metrics"]["gap"] == pytest.approx(np.linalg.norm(_unit(img).mean(0) - _unit(txt).mean(0)), abs=1e-5)
    assert res["metrics"]["cos_true_pairs"] == pytest.approx(np.mean(np.sum(img[owners] * txt, 1)), abs=1e-5)
    assert res["metrics"]["i2t_caption_r1"] == res["metrics"]["i2t_r1"]  # every text distinct

    single = write_shards([Sample(s.key, s.image, c[0], s.label) for s, c in zip(base, lines)],
                          tmp_path / "single", num_shards=1)["pattern"]
    one = evaluate.evaluate_checkpoint("structure-tiny", random_checkpoint, single, device="cpu")
    assert one["num_texts"] == one["num_samples"] == 60
    stats = {}
    i1, t1, y1 = evaluate.encode_shards(model, preprocess, tok, single, stats=stats)
    assert stats["text_image"].tolist() == list(range(60))
    paired = M.all_metrics(i1, t1, y1)
    assert {k: one["metrics"][k] for k in paired} == paired  # exactly the paired protocol


def coco_val_results(run_dir, val, json_text_key=None):
    """``(first validation line of the run, the evaluator's metrics on its epoch_1.pt)``, once the
    validation's retrieval and gap numbers are checked to be the evaluator's COCO-protocol ones
    (40 validation images with 79 captions)."""
    import json

    from openclip_structure.evaluation import evaluator as evaluate

    r = [json.loads(line) for line in open(run_dir / "checkpoints" / "results.jsonl")][0]
    ours = evaluate.evaluate_checkpoint("structure-tiny", str(run_dir / "checkpoints" / "epoch_1.pt"), val,
                                        device="cpu", json_text_key=json_text_key)
    assert r["num_texts"] == ours["num_texts"] == 79 and ours["num_samples"] == 40
    m = ours["metrics"]
    for k in (1, 5, 10):
        assert r[f"image_to_text_R@{k}"] == pytest.approx(m[f"i2t_r{k}"], abs=1e-9)
        assert r[f"text_to_image_R@{k}"] == pytest.approx(m[f"t2i_r{k}"], abs=1e-9)
    for ours_key, val_key in (("gap", "modality_gap"), ("cos_true_pairs", "cos_true_pairs"),
                              ("separability", "modality_separability")):
        assert r[val_key] == pytest.approx(m[ours_key], abs=1e-5), val_key
    return r, m


@pytest.mark.slow
def test_val_data_uses_the_coco_protocol(tmp_path):
    """open_clip 3.x training with multi-caption --val-data: its validation results carry the COCO-
    protocol retrieval and gap numbers, equal to the evaluator's on the saved checkpoint; the group
    metrics (--val-structure-metrics all) use every caption. The training data's one-word captions
    (--text-aug captions) are counted in one log line."""
    import subprocess

    from helpers import ROOT, command, env
    from openclip_structure.data.reader import Sample
    from openclip_structure.data.sources import digits_samples
    from openclip_structure.data.writer import write_shards

    digits = digits_samples()[:104]
    # training: every 8th sample a one-word caption (no different text view), the others two captions
    train_samples = [Sample(s.key, s.image, f"digit{i}" if i % 8 == 0 else f"{s.caption}\nthe digit {s.label}", s.label)
                     for i, s in enumerate(digits[:64])]
    train = write_shards(train_samples, tmp_path / "train", num_shards=2)["pattern"]
    val_samples = [Sample(s.key, s.image, "\n".join([f"{s.caption}, picture {i}", f"the digit {s.label}, image {i}",
                                                     f"picture {i}"][: 1 + i % 3]), s.label)
                   for i, s in enumerate(digits[64:])]
    val = write_shards(val_samples, tmp_path / "val", num_shards=1)["pattern"]
    argv = ["--train-data", train, "--dataset-type", "webdataset", "--train-num-samples", "64", "--val-data", val,
            "--val-num-samples", "40", "--model", "structure-tiny", "--batch-size", "32", "--epochs", "1",
            "--workers", "1", "--lr", "1e-3", "--warmup", "1", "--logs", str(tmp_path / "logs"), "--name", "coco",
            "--val-structure-metrics", "all", "--seed", "0", "--gc-aug-weight", "0.1", "--text-aug", "captions"]
    proc = subprocess.run(command(argv), capture_output=True, text=True, env={**env(), "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    run_dir = tmp_path / "logs" / "coco"
    r, m = coco_val_results(run_dir, val)
    assert r["i2t_class_r1"] == pytest.approx(m["i2t_class_r1"], abs=1e-9)
    assert r["mixed_v_measure"] == pytest.approx(m["mixed_v_measure"], abs=1e-6)
    log = (run_dir / "out.log").read_text()
    assert "several captions per image" in log and "40 images / 79 captions" in log
    assert log.count("had no text view different from the caption") == 1
    assert "--text-aug captions: 8 of 64 training samples in the first epoch had no text view" in log


def test_extra_validation_pass_logs_its_time_or_its_error(caplog):
    """The COCO-protocol and group-metrics passes share one wrapper: metrics and one timing line, or
    an error line and {} (training goes on), or {} and no line when there is nothing to add."""
    import logging

    from openclip_structure.evaluation.in_training import extra_pass

    with caplog.at_level(logging.INFO):
        assert extra_pass("COCO-protocol validation", lambda: ({"num_texts": 79.0}, "40 images / 79 captions")) \
            == {"num_texts": 79.0}
        assert extra_pass("group metrics", lambda: 1 / 0) == {}
        assert extra_pass("COCO-protocol validation", lambda: None) == {}
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "openclip-structure" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0][0] == "INFO" and lines[0][1].startswith(
        "openclip-structure: COCO-protocol validation on 40 images / 79 captions (extra pass) in ")
    assert lines[1] == ("ERROR", "openclip-structure: group metrics skipped this evaluation: division by zero")
