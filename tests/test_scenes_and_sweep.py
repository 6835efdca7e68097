"""The second bundled task (digit scenes with nuisance attributes) and the weight-sweep script's
statistics and outputs (no training: the runs are replaced by fixed metrics)."""
import io
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from openclip_structure.data import scenes  # noqa: E402


@pytest.fixture(scope="module")
def samples():
    return scenes.scene_samples(32, seed=0)


def _attributes(caption):
    found = {}
    for name, table in (("ink", scenes.INKS), ("background", scenes.BACKGROUNDS)):
        hits = [k for k in table if re.search(rf"\b{k}\b", caption)]
        assert len(hits) == 1, (caption, name, hits)
        found[name] = hits[0]
    return found


def test_captions_fit_the_tiny_context_untruncated(samples):
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")  # same BPE as the tiny configs, context 77
    lengths = [int((tok([s.caption])[0] != 0).sum()) for s in samples]
    assert max(lengths) <= 16, max(lengths)  # structure-tiny's context_length, SOT and EOT included


def test_every_named_attribute_is_in_the_image(samples):
    """Read the attributes back from the pixels, independently of the renderer."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    inks = {k: np.array(v, float) for k, v in scenes.INKS.items()}
    for s in samples[:300]:
        a = _attributes(s.caption)
        img = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"), dtype=float)
        plain = np.asarray(Image.fromarray(np.round(digits[int(s.key[-6:])] * 255 / 16).astype(np.uint8))
                           .resize((32, 32), Image.BILINEAR), float)
        bg = np.array(scenes.BACKGROUNDS[a["background"]], float)
        assert np.abs(img[plain == 0] - bg).max() <= 1, s.caption  # where there is no ink: the named background
        diff = np.abs(img - bg).sum(-1)
        colour = img[plain > 0.6 * plain.max()].mean(0) - bg  # blended ink: its direction away from the background
        cos = {k: (v - bg) @ colour / (np.linalg.norm(v - bg) * np.linalg.norm(colour)) for k, v in inks.items()}
        assert max(cos, key=cos.get) == a["ink"], (s.caption, colour)
        assert np.corrcoef(plain.ravel(), diff.ravel())[0, 1] > 0.95, s.caption  # the plain digit's shape


def test_labels_are_the_digits_and_named_in_the_caption(samples):
    from sklearn.datasets import load_digits

    from openclip_structure.data.sources import DIGIT_WORDS

    assert [s.label for s in samples] == [int(y) for y in load_digits().target]
    for s in samples:
        assert re.search(rf"\b({DIGIT_WORDS[s.label]}|{s.label})\b", s.caption), s.caption


def test_captions_vary_beyond_the_class_and_the_seed_fixes_the_data(samples):
    # 10 digits x 3 inks x 2 backgrounds, each in 6 templates (plain digits: 120 distinct captions)
    contents = {(s.label,) + tuple(_attributes(s.caption).values()) for s in samples}
    assert len(contents) == 60
    assert len({s.caption for s in samples}) > 500
    again = scenes.scene_samples(32, seed=0)
    assert [(s.caption, s.image) for s in again[:50]] == [(s.caption, s.image) for s in samples[:50]]
    other = scenes.scene_samples(32, seed=1)
    assert sum(a.caption != b.caption for a, b in zip(other, samples)) > len(samples) // 2


def test_paired_verdict_matches_a_paired_t_test():
    from scipy import stats

    import sweep

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 7))
        base = {s: {"m": float(rng.normal())} for s in range(n)}
        shift = float(rng.normal(scale=0.6))
        runs = {s: {"m": base[s]["m"] + shift + float(rng.normal(scale=0.3))} for s in range(n)}
        mean, se, k, verdict = sweep.paired(base, runs, "m")
        d = np.array([runs[s]["m"] - base[s]["m"] for s in range(n)])
        res = stats.ttest_rel([runs[s]["m"] for s in range(n)], [base[s]["m"] for s in range(n)])
        assert k == n and mean == pytest.approx(d.mean()) and se == pytest.approx(abs(d.mean() / res.statistic))
        assert verdict == ("neutral" if res.pvalue > 0.05 else ("up" if d.mean() > 0 else "down")), res


def test_sweep_writes_table_json_and_one_plot_per_sweep(tmp_path, monkeypatch):
    import demo
    import sweep

    def fake_run_all(runs, data, size, out_dir, device, jobs, threads):
        out = []
        for method, flags, seed in runs:
            w = float(flags[1]) if flags else 0.0
            m = {"zeroshot_top1": 0.9 - 0.1 * w + 0.01 * seed, "mixed_v_measure": 0.8, "i2t_class_r1": 0.9,
                 "gap": 0.4 - 0.1 * w, "gc_cross_asym": 0.2 - 0.1 * w}
            out.append(("ckpt", m))
        return out

    monkeypatch.setattr(demo, "run_all", fake_run_all)
    monkeypatch.setattr(demo, "make_data", lambda path, task: {"val": {"pattern": ""}})
    assert sweep.main(["--sweeps", "gc", "--seeds", "0", "1", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sweep.json").read_text())
    p = res["sweeps"]["gc"]["paired"]
    assert p["1"]["zeroshot_top1"]["diff"] == pytest.approx(-0.1) and p["1"]["zeroshot_top1"]["verdict"] == "down"
    assert p["0.05"]["mixed_v_measure"]["verdict"] == "neutral"
    assert os.path.getsize(tmp_path / "sweep_gc.png") > 1000
    assert "| gc | 0.25 |" in (tmp_path / "sweep.md").read_text()
