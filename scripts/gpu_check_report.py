"""The GPU check's report (``gpu_check.py``): the one-line summary of each section, the tables
printed at the end, and the machine recorded in the JSON file.
"""
from __future__ import annotations

import os
import subprocess
from typing import Dict

from gpu_check_common import ROOT
from gpu_check_sections import SECTIONS


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def summary(name: str, sec: Dict) -> str:
    if sec["status"] == "skipped":
        return sec.get("reason", "")[:100]
    if sec["status"] == "failed":
        return sec.get("error", "").strip().splitlines()[0][:100] if sec.get("error") else ""
    if name == "cuda_tests":
        return f"{sec['passed']} passed, {sec['skipped']} skipped"
    if name == "train_throughput":
        return f"{sec['model']} batch {sec['batch']}: see the table below"
    if name == "loss_bench":
        parts = []
        for precision, p in sec["precisions"].items():
            worst = max((c["cases"]["all"]["time_ratio"], c["B_local"], c["world"], c["D"]) for c in p["configs"])
            parts.append(f"{precision}: 'all' <= {worst[0]:.2f}x ClipLoss ({worst[1]}x{worst[2]} D{worst[3]})")
        return f"{len(p['configs'])} shapes; " + "; ".join(parts)
    if name == "fsdp":
        worst = max(r["max_rel_diff"] for r in sec["runs"].values())
        return f"{sorted(sec['runs'])} match DDP (max rel diff {worst:.1e}); 2 ranks: {sec['two_ranks']['status']}"
    if name == "precision":
        return f"{len(sec['runs'])} runs (bf16, fp16+GradScaler) finite and decreasing"
    return ""


def report(res: Dict) -> str:
    lines = [f"GPU check ({'DRY RUN on CPU: numbers say nothing about GPUs' if res['dry_run'] else res['device_name']})",
             "", "| section | status | wall s | cap s | summary |", "|---|---|---:|---:|---|"]
    for name in SECTIONS:
        sec = res["sections"].get(name)
        if sec is not None:
            lines.append(f"| {name} | {sec['status']} | {sec['wall_s']:.0f} | {sec['cap_s']:.0f} | {summary(name, sec)} |")
    train = res["sections"].get("train_throughput", {})
    if train.get("configs"):
        lines += ["", f"training throughput ({train['model']}, batch {train['batch']}, {train['precision']}):", "",
                  "| config | samples/s | x plain | peak MiB | x plain | data share |", "|---|---:|---:|---:|---:|---:|"]
        for n, e in train["configs"].items():
            lines.append(f"| {n} | {fmt(e.get('samples_per_s'), '.1f')} | {fmt(e.get('throughput_ratio'), '.3f')} | "
                         f"{fmt(e.get('peak_mem_mb'), '.0f')} | {fmt(e.get('peak_mem_ratio'), '.3f')} | "
                         f"{fmt(e.get('data_share'), '.2f')} |")
    return "\n".join(lines)


def machine(dry: bool) -> Dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(device_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    device_count=torch.cuda.device_count())
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info
