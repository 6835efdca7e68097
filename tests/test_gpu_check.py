"""The GPU check script (scripts/gpu_check.sh) cannot rot: its dry run (CPU, tiny shapes) runs
every section and writes a JSON file with sane content. No timing is asserted (ratios are only
required to be finite and positive)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from openclip_structure.registry import TERMS as REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_losses_cases  # noqa: E402

SECTIONS = ["cuda_tests", "train_throughput", "loss_bench", "fsdp", "precision"]
TRAIN_CONFIGS = ["plain", "gap", "gc", "gap+gc", "views", "all"]
TERMS = bench_losses_cases.SINGLE_TERMS + ["all"]  # every registry term alone (and its variants), all together


def finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "dry.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHON"] = sys.executable
    env.setdefault("OMP_NUM_THREADS", "1")
    before = set(os.listdir(ROOT))
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd="/")
    proc.new_in_checkout = sorted(set(os.listdir(ROOT)) - before)
    return proc, out


@pytest.mark.slow
def test_dry_run_writes_every_section(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.new_in_checkout == []  # logs, shards, JSON: all in temporary folders
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and set(res["sections"]) == set(SECTIONS)
    for name, sec in res["sections"].items():
        assert sec["status"] in ("ok", "skipped"), (name, sec.get("error"))
        assert 0 < sec["wall_s"] <= sec["cap_s"] + 60, name
    # the table names every section
    for name in SECTIONS:
        assert f"| {name} |" in proc.stdout
    assert "| plain |" in proc.stdout and "| all |" in proc.stdout


@pytest.mark.slow
def test_dry_run_cuda_section_skips_with_a_reason_on_cpu(dry_run):
    sec = json.loads(dry_run[1].read_text())["sections"]["cuda_tests"]
    if torch.cuda.is_available():  # a CI machine with a GPU runs them for real
        assert sec["status"] == "ok" and sec["passed"] > 0
        return
    assert sec["status"] == "skipped"
    assert sec["skipped"] >= 5 and sec["passed"] == 0 and not sec["failed_tests"]
    assert "CUDA" in sec["reason"]


@pytest.mark.slow
def test_dry_run_numbers_are_sane(dry_run):
    s = json.loads(dry_run[1].read_text())["sections"]
    train = s["train_throughput"]
    assert train["status"] == "ok" and set(train["configs"]) == set(TRAIN_CONFIGS)
    for name, e in train["configs"].items():
        assert finite_positive(e["samples_per_s"]) and finite_positive(e["throughput_ratio"]), name
        assert finite_positive(e["peak_mem_mb"]) and finite_positive(e["peak_mem_ratio"]), name
    assert train["configs"]["plain"]["throughput_ratio"] == 1.0
    # every enabled term was logged by the launcher
    assert {key for spec in REGISTRY for key in spec.logged} <= set(train["configs"]["all"]["last_losses"])

    bench = s["loss_bench"]
    assert bench["status"] == "ok" and set(bench["precisions"]) == {"fp32", "amp_bf16"}
    for precision, p in bench["precisions"].items():
        assert p["configs"], precision
        for cfg in p["configs"]:
            assert finite_positive(cfg["clip_ms"])
            for term in TERMS:
                assert finite_positive(cfg["cases"][term]["time_ratio"]), (precision, term, cfg["cases"][term])

    fsdp = s["fsdp"]
    assert fsdp["status"] == "ok"
    assert {"ddp_1rank", "fsdp_1rank"} <= set(fsdp["runs"])
    assert fsdp["two_ranks"]["status"] == "ok" and "fsdp_2rank" in fsdp["runs"]  # gloo runs 2 ranks on CPU
    ref = fsdp["reference_losses"]
    assert len(ref) >= 3 and all(math.isfinite(x) for x in ref) and ref[-1] < ref[0]
    for name, r in fsdp["runs"].items():
        assert r["max_rel_diff"] <= 1e-3, name

    prec = s["precision"]
    assert prec["status"] == "ok"
    assert {r["precision"] for r in prec["runs"]} == {"amp_bf16", "amp"}
    assert all(r["ok"] and r["total_last_third"] < r["total_first_third"] for r in prec["runs"])
