"""The main job end to end on a tiny budget: `scripts/demo.py --quick` trains every method
through the launcher, evaluates every checkpoint and writes the table, JSON and plots."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


@pytest.mark.slow
def test_quick_demo_produces_the_full_table(tmp_path):
    import demo

    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--quick",
                           "--out", str(tmp_path / "demo")], capture_output=True, text=True, timeout=900,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out_dir = tmp_path / "demo-quick"
    results = json.loads((out_dir / "results.json").read_text())
    expected = ["baseline", "gap", "gc", "gc_aug", "bridge", "separation", "all"]
    assert list(results["summary"]) == expected == [m for m in demo.available_methods()]
    for method in expected:
        for key, _ in demo.COLUMNS:
            mean, std, n = results["summary"][method][key]
            assert math.isfinite(mean) and math.isfinite(std) and n == 1, (method, key)
    table = (out_dir / "results.md").read_text()
    assert all(f"| {m} " in table for m in expected)
    assert "[demo] run 7/7" in proc.stdout and "mixed V" in proc.stdout
    assert "- baseline: seed 0 " in table  # the per-seed zero-shot lines
    for png in results["plots"]:
        assert os.path.getsize(png) > 1000
