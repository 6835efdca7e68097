"""Smoke test of the benchmark scripts (docs/performance.md): both run in --quick mode and report a
finite time ratio for every term. No timing is asserted (benchmarks, not timed tests)."""
import json
import math
import os
import subprocess
import sys

import pytest

from openclip_structure.registry import TERMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: every logged term of the registry, plus the benchmark's variants and all terms together
LOGGED = [key for spec in TERMS for key in spec.logged]
LOSS_TERMS = [key.removesuffix("_loss") for key in LOGGED] + ["gap_cu(modality)", "gc_aug(text-aug)", "all"]
STEP_CONFIGS = ["baseline", "gap (atp+cu)", "gc", "gap+gc", "views-ref", "gc_aug", "bridge", "sep", "inmodal", "all"]


def run_quick(script, tmp_path):
    out = tmp_path / (script + ".json")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "machine:" in proc.stdout  # the tables name the machine
    return json.loads(out.read_text())


def finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_losses_quick_reports_every_term(tmp_path):
    res = run_quick("bench_losses.py", tmp_path)
    assert res["machine"]["cpu"] and res["machine"]["torch"]
    assert res["configs"], "no configuration measured"
    for cfg in res["configs"]:
        cases = cfg["cases"]
        assert cases["clip"]["ratio"] == pytest.approx(1.0)
        for term in LOSS_TERMS:
            assert term in cases, (term, sorted(cases))
            assert finite_positive(cases[term]["ratio"]), (term, cases[term])
            assert finite_positive(cases[term]["ms"]), (term, cases[term])


@pytest.mark.slow
def test_bench_step_quick_reports_every_configuration(tmp_path):
    res = run_quick("bench_step.py", tmp_path)
    assert res["models"], "no model measured"
    # the launcher's view wiring exists: every view configuration is measured, none left pending
    assert res["pending"] == {}, res["pending"]
    for model in res["models"]:
        configs = model["configs"]
        for name in STEP_CONFIGS:
            assert name in configs, (name, sorted(configs))
            assert finite_positive(configs[name]["ratio"]), (name, configs[name])
            assert finite_positive(configs[name]["samples_per_s"]), (name, configs[name])
        # every enabled term was really computed (its loss is in the step's output)
        assert "gc_loss" in configs["gc"]["loss_keys"]
        assert set(LOGGED) <= set(configs["all"]["loss_keys"]), configs["all"]["loss_keys"]
