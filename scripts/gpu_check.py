"""GPU check: one command that exercises the plugin's CUDA path and writes one JSON file.

    bash scripts/gpu_check.sh --out gpu_check.json             # on a machine with one CUDA GPU, <= 8 min
    bash scripts/gpu_check.sh --dry-run --out dry.json         # CPU, tiny shapes, ~2 min (what CI runs)
    bash scripts/gpu_check.sh --out rerun.json --sections fsdp precision   # rerun some sections only

Sections (each recorded as ``{"status": "ok" | "skipped" | "failed", "reason"/"error", "wall_s",
"cap_s", numbers}``; each runs in subprocesses under its own wall-time cap):

1. ``cuda_tests``: ``pytest -m cuda tests`` (the CUDA tests skip cleanly without CUDA).
2. ``train_throughput``: the launcher (``openclip_structure.main``) trains a ViT-B-32 (random init)
   on the bundled digits as webdataset shards (``scripts/make_shards.py``, resampled; 224 px after
   open_clip's preprocess), ``--precision amp_bf16``, for plain, gap, gc, gap+gc, the view terms and
   all terms: samples/s (from open_clip's own step timing, first log windows dropped) and peak
   memory (``torch.cuda.max_memory_allocated``), each as a ratio to plain from the same run.
   (open_clip's ``--dataset-type synthetic`` cannot be used: it reads ``preprocess.transforms[0]``,
   which the launcher's two-view preprocess wrapper lacks.)
3. ``loss_bench``: ``scripts/bench_losses.py`` on the GPU at B_local 256/1024 x simulated world
   8/64 x D 512/1024, in float32 and as bf16 training runs it (``--amp-bf16``: bf16 features,
   ClipLoss under autocast): time and peak memory of every term as ratios to open_clip's ClipLoss.
4. ``fsdp``: ``scripts/bench_fsdp.py`` with the plugin's loss: DDP and FSDP2 on one rank, and FSDP2
   on two ranks sharing the GPU (NCCL normally refuses: then skipped with NCCL's reason); the
   loss trajectories must match the one-rank DDP run's.
5. ``precision``: ``scripts/check_precision.py``: finite terms and decreasing losses under bf16
   autocast and fp16 autocast + GradScaler, every configuration.

``--dry-run`` runs the same code on CPU with tiny shapes (structure-tiny, a few steps); the
measured numbers then say nothing about GPUs. Exit status: 0 when no section failed.

The code: ``gpu_check_sections.py`` (the five sections), ``gpu_check_common.py`` (caps, subprocess
runs, JSON), ``gpu_check_report.py`` (the summary tables, the machine); this file is the command
line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

from gpu_check_common import Deadline
from gpu_check_report import machine, report
from gpu_check_sections import RUNNERS, SECTIONS, train_probe

#: wall-time cap per section in seconds (real mode: 470 s in all, inside the 8-minute budget)
CAPS = {"cuda_tests": 45, "train_throughput": 180, "loss_bench": 75, "fsdp": 90, "precision": 80}
DRY_CAPS = {s: 300 for s in SECTIONS}


def plan(dry: bool) -> Dict[str, Dict]:
    """Shapes and step counts of every section (real: GPU-sized; dry: tiny, CPU)."""
    if dry:
        return {"train": dict(model="structure-tiny", batch=8, steps=6, log_every=2, workers=1),
                "loss_bench": {"fp32": ["--quick"], "amp_bf16": ["--quick", "--amp-bf16"]},
                "fsdp": dict(model="structure-tiny", batch=4, steps=4, lr=1e-3),
                "precision": ["--model", "structure-tiny", "--batch", "8", "--steps", "6", "--threads", "1",
                              "--configs", "baseline", "all"]}
    workers = max(1, min(12, (os.cpu_count() or 4) - 2))
    return {"train": dict(model="ViT-B-32", batch=256, steps=100, log_every=10, workers=workers),
            "loss_bench": {p: ["--device", "cuda", "--b-local", "256", "1024", "--world", "8", "64",
                               "--dim", "512", "1024", "--reps", "2", "--min-time", "0.01"] + flag
                           for p, flag in (("fp32", []), ("amp_bf16", ["--amp-bf16"]))},
            "fsdp": dict(model="ViT-B-32", batch=32, steps=8, lr=3e-4),
            "precision": ["--device", "cuda", "--model", "small", "--batch", "128", "--steps", "30"]}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Sections: " + ", ".join(SECTIONS) + ". Details: docs/performance.md.")
    ap.add_argument("--out", required=True, help="JSON file to write (in both modes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps (CI)")
    ap.add_argument("--sections", nargs="*", default=SECTIONS, choices=SECTIONS, help="run only these sections")
    args = ap.parse_args(argv)
    info = machine(args.dry_run)
    if not args.dry_run and not info["cuda_available"]:
        ap.error("no CUDA device is available: run with --dry-run on a machine without a GPU")
    caps = DRY_CAPS if args.dry_run else CAPS
    res = {"dry_run": args.dry_run, "device_name": info.get("device_name", "cpu"), "machine": info,
           "caps_s": {s: caps[s] for s in args.sections}, "sections": {}}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = {"tmp": tmp, "plan": plan(args.dry_run), "device": "cpu" if args.dry_run else "cuda"}
        for name in args.sections:
            print(f"[gpu_check] {name} (cap {caps[name]} s) ...", flush=True)
            deadline = Deadline(caps[name])
            try:
                sec = RUNNERS[name](ctx, deadline)
            except Exception:  # a broken section is recorded, the others still run
                sec = {"status": "failed", "error": traceback.format_exc()[-3000:]}
            sec.update(wall_s=round(time.time() - deadline.t0, 1), cap_s=caps[name])
            res["sections"][name] = sec
            print(f"[gpu_check] {name}: {sec['status']} ({sec['wall_s']:.0f} s)"
                  + (f": {sec.get('error') or sec.get('reason')}"[:2000] if sec["status"] != "ok" else ""), flush=True)
    res["wall_s"] = round(time.time() - t0, 1)
    res["ok"] = all(s["status"] != "failed" for s in res["sections"].values())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("\n" + report(res) + f"\n\n(total {res['wall_s']:.0f} s; JSON: {args.out})")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--train-probe":  # internal: one launcher run (section 2)
        rest = sys.argv[3:]
        sys.exit(train_probe(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest))
    sys.exit(main())
