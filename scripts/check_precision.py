"""Mixed-precision check: every loss term stays finite and the training loss decreases under bf16
autocast and under fp16 autocast with a GradScaler, for every plugin configuration.

    python scripts/check_precision.py --device cuda --json out.json          # on a GPU
    python scripts/check_precision.py --model structure-tiny --steps 10      # CPU smoke run

Each (precision, configuration) pair trains a fresh model (same seed) for ``--steps`` steps on one
fixed batch of random images and captions, with open_clip_train's step as ``scripts/bench_step.py``
runs it (:class:`bench_step.Runner`: the plugin's loss from its flags, the launcher's two-view
wiring, AdamW, autocast, ``GradScaler`` for fp16). A run passes when every logged loss term is
finite at every step, the total loss of the last third of the steps is below that of the first
third (on a fixed batch the model can only fit it better), and, for fp16, the scaler skipped fewer
than half of the steps. Exit status 1 when a run fails. ``scripts/gpu_check.py`` runs this as its
precision section.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_step import CONFIGS, Runner, register_small_config  # noqa: E402
from bench_common import write_json  # noqa: E402

#: every configuration of bench_step except its reference (ClipLoss + the second view, no term)
CHECKED = [n for n in CONFIGS if n != "views-ref"]
PRECISIONS = ["amp_bf16", "amp"]


def check_run(name: str, model: str, precision: str, batch: int, steps: int, lr: float, device: str) -> Dict:
    runner = Runner(name, model, batch, lr=lr, device=device, precision=precision)
    history: List[Dict[str, float]] = []
    skipped = 0
    for _ in range(steps):
        scale = runner.scaler.get_scale() if runner.scaler is not None else None
        history.append(runner.step(record=True))
        if runner.scaler is not None and runner.scaler.get_scale() < scale:  # inf/nan gradients: step skipped
            skipped += 1
    totals = [sum(h.values()) for h in history]
    third = max(1, steps // 3)
    first, last = sum(totals[:third]) / third, sum(totals[-third:]) / third
    nonfinite = sorted({k for h in history for k, v in h.items() if not math.isfinite(v)})
    problems = []
    if nonfinite:
        problems.append(f"non-finite terms: {nonfinite}")
    if not last < first:
        problems.append(f"loss did not decrease (first third {first:.4f}, last third {last:.4f})")
    if skipped * 2 >= steps:
        problems.append(f"GradScaler skipped {skipped} of {steps} steps")
    return {"config": name, "precision": precision, "ok": not problems, "problems": problems,
            "terms": sorted(history[0]), "first": history[0], "last": history[-1],
            "total_first_third": first, "total_last_third": last, "scaler_skipped_steps": skipped}


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small", help="'small' (bench_step's ViT with D=512) or an open_clip model name")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precisions", nargs="*", default=PRECISIONS, choices=PRECISIONS)
    p.add_argument("--configs", nargs="*", default=CHECKED, choices=CHECKED)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps < 3:
        p.error("--steps must be at least 3 (the loss is compared between the first and last thirds)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from openclip_structure.main import register_model_configs

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights": random init is intended
    register_model_configs()
    t0 = time.time()
    runs = []
    res = {"device": args.device, "model": args.model, "batch": args.batch, "steps": args.steps, "lr": args.lr,
           "planned_runs": len(args.precisions) * len(args.configs), "runs": runs}
    with tempfile.TemporaryDirectory() as tmp:
        model = register_small_config(tmp) if args.model == "small" else args.model
        for precision in args.precisions:
            for name in args.configs:
                r = check_run(name, model, precision, args.batch, args.steps, args.lr, args.device)
                runs.append(r)
                res.update(ok=all(x["ok"] for x in runs), elapsed_s=time.time() - t0)
                write_json(res, args.json)  # after every run: a run cut off by a time limit keeps these
                print(f"{precision:9s} {name:14s} {'ok' if r['ok'] else 'FAILED'}  total {r['total_first_third']:.4f} -> "
                      f"{r['total_last_third']:.4f}" + (f"  skipped {r['scaler_skipped_steps']}" if precision == "amp" else "")
                      + ("" if r["ok"] else "  " + "; ".join(r["problems"])), flush=True)
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
