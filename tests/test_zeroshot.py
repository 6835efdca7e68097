"""Zero-shot classification and class-level retrieval (openclip_structure.evaluation.zeroshot, metrics)."""
import itertools

import numpy as np
import pytest
import torch

from openclip_structure.evaluation import inputs as EI
from openclip_structure.evaluation import metrics as M
from openclip_structure.evaluation import zeroshot as Z
from openclip_structure.data.sources import DIGIT_TEMPLATES, DIGIT_WORDS, DIGIT_ZEROSHOT_TEMPLATES
from openclip_structure.data.writer import write_prompt_files


def test_zero_shot_accuracy_against_hand_computation():
    # 3 classes on the unit circle at 0, 120 and 240 degrees; 5 images at chosen angles.
    deg = np.deg2rad
    classes = np.array([[np.cos(deg(a)), np.sin(deg(a))] for a in (0, 120, 240)])
    angles = [10, 100, 200, 250, 70]
    img = np.array([[np.cos(deg(a)), np.sin(deg(a))] for a in angles]) * 3.0  # unnormalised on purpose
    labels = np.array([0, 1, 1, 2, 1])
    # by hand: image 0 (10 deg) -> class 0, correct; image 1 (100) -> class 1, correct; image 2
    # (200) -> class 2 (40 deg away, class 1 is 80 deg away), wrong, class 1 ranks 2nd; image 3
    # (250) -> class 2, correct; image 4 (70 deg: 50 from class 1, 70 from class 0) -> class 1, correct.
    out = Z.zero_shot_accuracy(img, classes, labels, ks=(1, 2, 5))
    assert out["zeroshot_top1"] == pytest.approx(4 / 5)
    assert out["zeroshot_top2"] == pytest.approx(1.0)
    assert "zeroshot_top5" not in out  # only 3 classes
    # per-class top-1 recall: class 0: 1/1, class 1: 2/3 (images 1, 4 right, 2 wrong), class 2: 1/1
    assert out["zeroshot_mean_per_class_recall"] == pytest.approx((1 + 2 / 3 + 1) / 3)


def test_zero_shot_accuracy_matches_argmax_loop_on_random_embeddings():
    rng = np.random.default_rng(0)
    img, cls = rng.standard_normal((200, 8)), rng.standard_normal((7, 8))
    labels = rng.integers(0, 7, size=200)
    out = Z.zero_shot_accuracy(torch.from_numpy(img), cls, labels, ks=(1, 5))
    hits1 = hits5 = 0
    for x, y in zip(img, labels):
        scores = [float(np.dot(x, c) / (np.linalg.norm(x) * np.linalg.norm(c))) for c in cls]
        order = sorted(range(7), key=lambda k: -scores[k])
        hits1 += order[0] == y
        hits5 += y in order[:5]
    assert out["zeroshot_top1"] == pytest.approx(hits1 / 200)
    assert out["zeroshot_top5"] == pytest.approx(hits5 / 200)


@pytest.mark.parametrize("labels, match", [([0, 3], r"class ids in \[0, 3\)"), ([0, -1], r"class ids"),
                                           ([0], "one entry per embedding row")])
def test_zero_shot_accuracy_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        Z.zero_shot_accuracy(np.ones((2, 4)), np.eye(3, 4), np.array(labels))


def test_zero_shot_accuracy_dimension_mismatch():
    with pytest.raises(ValueError, match="same dimension"):
        Z.zero_shot_accuracy(np.ones((2, 4)), np.eye(3), [0, 1])


# ----------------------------------------------------------------------------- class-level retrieval


def test_class_retrieval_recall_matches_double_loop():
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((60, 6)), rng.standard_normal((60, 6))
    labels = rng.integers(0, 4, size=60)
    out = M.class_retrieval_recall(img, txt, labels, ks=(1, 3))
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    for name, (q, g) in (("i2t", (a, b)), ("t2i", (b, a))):
        for k in (1, 3):
            hits = 0
            for i in range(60):
                s = g @ q[i]
                top = sorted(range(60), key=lambda j: -s[j])[:k]
                hits += any(labels[j] == labels[i] for j in top)
            assert out[f"{name}_class_r{k}"] == pytest.approx(hits / 60), (name, k)


def test_class_retrieval_is_well_posed_with_identical_captions():
    # every caption of a class is identical: instance R@1 is at most 1/(class size), class R@1 is 1
    labels = np.repeat(np.arange(3), 10)
    txt = np.eye(3)[labels] + 0.0
    img = np.eye(3)[labels] + 0.01 * np.random.default_rng(0).standard_normal((30, 3))
    assert M.class_retrieval_recall(img, txt, labels, ks=(1,))["i2t_class_r1"] == 1.0
    assert M.retrieval_recall(img, txt, ks=(1,))["i2t_r1"] == 1.0  # ties count for the match ...
    assert M.class_retrieval_recall(img, txt, labels, ks=(1,))["t2i_class_r1"] == 1.0
    assert M.retrieval_recall(img, txt, ks=(1,))["t2i_r1"] < 0.5  # ... but t2i cannot tell the images apart


def test_caption_retrieval_counts_identical_captions_as_one_instance():
    rng = np.random.default_rng(3)
    img, txt = rng.standard_normal((40, 5)), rng.standard_normal((40, 5))
    captions = [f"caption {int(c)}" for c in rng.integers(0, 15, size=40)]  # many duplicates
    out = M.caption_retrieval_recall(img, txt, captions, ks=(1, 2))
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    for name, (q, g) in (("i2t", (a, b)), ("t2i", (b, a))):
        for k in (1, 2):
            hits = sum(any(captions[j] == captions[i] for j in np.argsort(-(g @ q[i]))[:k]) for i in range(40))
            assert out[f"{name}_caption_r{k}"] == pytest.approx(hits / 40), (name, k)
    unique = [f"c{i}" for i in range(40)]  # with unique captions it is instance retrieval
    inst = M.retrieval_recall(img, txt, ks=(1, 2))
    assert {k.replace("_caption_", "_"): v for k, v in M.caption_retrieval_recall(img, txt, unique, ks=(1, 2)).items()} == inst


def test_class_retrieval_blocked(monkeypatch):
    rng = np.random.default_rng(2)
    img, txt, labels = rng.standard_normal((50, 5)), rng.standard_normal((50, 5)), rng.integers(0, 3, 50)
    full = M.class_retrieval_recall(img, txt, labels)
    monkeypatch.setattr(EI, "_BLOCK_ELEMENTS", 7 * 50)  # a module constant of this project
    assert M.class_retrieval_recall(img, txt, labels) == full


# ----------------------------------------------------------------------------- prompts


def test_digit_zero_shot_prompts_are_held_out():
    train = {t.format(w=w, n=n) for t in DIGIT_TEMPLATES for n, w in enumerate(DIGIT_WORDS)}
    prompts = {t.format(c=w) for t in DIGIT_ZEROSHOT_TEMPLATES for w in DIGIT_WORDS}
    assert len(prompts) == len(DIGIT_ZEROSHOT_TEMPLATES) * 10
    assert not prompts & train
    # not even a training template with the class slot filled differently
    shapes = {t.replace("{w}", "{c}").replace("{n}", "{c}") for t in DIGIT_TEMPLATES}
    assert not shapes & set(DIGIT_ZEROSHOT_TEMPLATES)


def test_resolve_prompts_files_beside_shards_and_fallbacks(tmp_path):
    (tmp_path / "val").mkdir()
    pattern = str(tmp_path / "val" / "{00000..00001}.tar")
    names, templates, source = Z.resolve_prompts([0, 2], pattern)
    assert names == ["0", "1", "2"] and source["classnames"] == "the .cls ids"
    assert Z.template_text(templates[0]).count("{c}") == 1 and "SIMPLE_IMAGENET" in source["templates"]
    write_prompt_files(tmp_path, ["zero", "one", "two"], ["a {c}.", "the {c}"])  # parent of the shard folder
    names, templates, source = Z.resolve_prompts([0, 2], pattern)
    assert names == ["zero", "one", "two"] and templates == ["a {c}.", "the {c}"]
    assert source["classnames"].endswith("classnames.txt")
    (tmp_path / "mine.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match=r"label 2 has no class name: .*mine.txt names 2 classes"):
        Z.resolve_prompts([0, 2], pattern, classnames_file=tmp_path / "mine.txt")


@pytest.mark.parametrize("text, match", [("a photo\n", r"needs a \{c\} placeholder"), ("\n\n", "no non-empty line"),
                                         ("a {c} of {x}\n", "not a valid format string")])
def test_read_templates_refuses_bad_files(tmp_path, text, match):
    (tmp_path / "t.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        Z.read_templates(tmp_path / "t.txt")


def test_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="class names file not found: .*nope.txt"):
        Z.read_classnames(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------- the classifier


def test_build_classifier_matches_manual_prompt_average(tmp_path):
    import open_clip

    from openclip_structure.main import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("structure-tiny").eval()
    tok = open_clip.get_tokenizer("structure-tiny")
    names, templates = ["zero", "one", "two"], ["a {c}.", "the digit {c}", "{c}"]
    w = Z.build_classifier(model, tok, names, templates)
    assert w.shape == (3, model.text_projection.shape[1])
    with torch.no_grad():
        for i, name in enumerate(names):
            e = model.encode_text(tok([t.replace("{c}", name) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(0)
            torch.testing.assert_close(w[i], m / m.norm(), atol=1e-5, rtol=1e-5)
    # the end-to-end metric on images whose embedding IS a class embedding: all correct
    files = write_prompt_files(tmp_path, names, templates)
    metrics, prompts = Z.zero_shot_metrics(model, tok, w.numpy()[[2, 0, 1]], np.array([2, 0, 1]), None,
                                           files["classnames"], files["templates"])
    assert metrics["zeroshot_top1"] == 1.0 and prompts["classnames"] == names and prompts["templates"] == templates


def test_template_text_of_open_clip_callables():
    import open_clip

    texts = [Z.template_text(t) for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
    assert all("{c}" in t for t in texts) and len(set(texts)) == len(texts)
    assert list(itertools.islice(texts, 1))[0].format(c="dog") == open_clip.SIMPLE_IMAGENET_TEMPLATES[0]("dog")
