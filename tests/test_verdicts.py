"""scripts/verdicts.py: the paired statistics against scipy.stats, Holm, and the report's verdicts
(no training: the sweeps' documents are made up)."""
import os
import sys

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import verdicts as V  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_stats_match_scipy(seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(0.93, 0.02, 10)
    other = base + rng.normal(0.01 * seed, 0.01, 10)
    st = V.paired_stats(base, other)
    ref = stats.ttest_rel(other, base)
    d = other - base
    lo, hi = stats.t.interval(0.95, df=9, loc=d.mean(), scale=stats.sem(d))
    assert st["diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert st["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert st["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert st["ci"] == pytest.approx([lo, hi], rel=1e-9)
    assert (st["up"], st["down"], st["tied"]) == (int((d > 0).sum()), int((d < 0).sum()), 0)
    assert st["sign_p"] == pytest.approx(stats.binomtest(st["up"], 10).pvalue, rel=1e-9)


def test_sign_count_with_ties_and_a_constant_difference():
    st = V.paired_stats([1, 2, 3, 4], [1, 3, 4, 5])
    assert (st["up"], st["down"], st["tied"]) == (3, 0, 1)
    assert st["sign_p"] == pytest.approx(stats.binomtest(3, 3).pvalue)
    const = V.paired_stats([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])  # exact in binary: sd 0
    assert const["p"] == 0.0 and const["ci"] == [0.5, 0.5]
    with pytest.raises(ValueError):
        V.paired_stats([1], [2])


def test_holm():
    # hand-worked: sorted p 0.01, 0.02, 0.04 -> 0.03, 0.04, 0.04
    assert V.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert V.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def _doc(name, w, base, shifts):
    keys = [k for k, _ in V.METRICS]
    b = {str(s): {k: v for k in keys} for s, v in enumerate(base)}
    runs = {str(s): {k: v + shifts[k][s] for k in keys} for s, v in enumerate(base)}
    return {"baseline": b, "size": {}, "sweeps": {name: {"flags": ["--x", "{w}"], "runs": {f"{w:g}": runs}}}}


def test_report_verdicts():
    rng = np.random.default_rng(0)
    base = list(rng.normal(0.9, 0.03, 10))
    noise = lambda: rng.normal(0, 0.01, 10)  # noqa: E731
    helps = {"zeroshot_top1": 0.05 + noise(), "i2t_class_r1": noise(), "mixed_v_measure": noise()}
    hurts = {"zeroshot_top1": 0.05 + noise(), "i2t_class_r1": noise(), "mixed_v_measure": -0.2 + noise()}
    neutral = {k: noise() for k, _ in V.METRICS}
    configs = [("a", 1.0), ("b", 0.3), ("c", 0.1)]
    doc = V.report({"a": _doc("a", 1.0, base, helps), "b": _doc("b", 0.3, base, hurts),
                    "c": _doc("c", 0.1, base, neutral)}, configs=configs)
    assert [doc["configs"][c]["verdict"] for c in ("a 1", "b 0.3", "c 0.1")] == ["helps", "hurts", "neutral"]
    assert doc["configs"]["a 1"]["stats"]["zeroshot_top1"]["up"] == 10
    loo = doc["configs"]["a 1"]["stats"]["zeroshot_top1"]["without_weakest_baseline_seed"]
    weakest = int(np.argmin(base))
    d = np.delete(helps["zeroshot_top1"], weakest)
    assert loo["dropped"] == weakest and loo["diff"] == pytest.approx(d.mean())
    assert loo["ci"] == pytest.approx(list(stats.t.interval(0.95, df=8, loc=d.mean(), scale=stats.sem(d))))
    assert doc["configs"]["b 0.3"]["flags"] == ["--x", "0.3"]
    ps = [doc["configs"][c]["stats"][k]["p_holm"] for c in doc["configs"] for k, _ in V.METRICS]
    raw = [doc["configs"][c]["stats"][k]["p"] for c in doc["configs"] for k, _ in V.METRICS]
    assert all(h >= r for h, r in zip(ps, raw)) and len(ps) == 9
    md = V.markdown(doc)
    assert "**helps**" in md and "**hurts**" in md and md.count("\n| ") >= 3 + 10


def test_demo_pairs_from_a_results_json(tmp_path):
    import json

    rng = np.random.default_rng(1)
    base = [{"gap": g, "mixed_v_measure": 0.3} for g in rng.normal(0.12, 0.01, 5)]
    # the gap method ran seeds 0, 1, 2 (demo's --method-seeds): paired on those three only
    gap = [{"gap": b["gap"] - 0.1 + e, "mixed_v_measure": 0.3 + e} for b, e in zip(base[:3], rng.normal(0, 0.002, 3))]
    doc = {"seeds": {"baseline": [0, 1, 2, 3, 4], "gap": [0, 1, 2]}, "runs": {"baseline": base, "gap": gap},
           "command": "python scripts/demo.py x"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "res"
    assert V.main(["--demo", str(path), "--pairs", "gap:baseline", "--metrics", "gap", "mixed_v_measure",
                   "--results", str(out), "--name", "cmp"]) == 0
    res = json.loads((out / "cmp.json").read_text())["pairs"]["gap vs baseline"]
    assert res["seeds"] == [0, 1, 2]
    st = res["stats"]["gap"]
    ref = stats.ttest_rel([g["gap"] for g in gap], [b["gap"] for b in base[:3]])
    assert st["p"] == pytest.approx(ref.pvalue, rel=1e-9) and st["verdict"] == "down" and st["down"] == 3
    assert res["stats"]["mixed_v_measure"]["verdict"] == "neutral"
    assert "gap vs baseline (3 seeds)" in (out / "cmp.md").read_text()
