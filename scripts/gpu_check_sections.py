"""The five sections of the GPU check (``gpu_check.py``, whose docstring describes them): each
``section_<name>(ctx, deadline)`` runs its subprocesses under the section's wall-time cap and
returns its record (``{"status": "ok" | "skipped" | "failed", ...}``). Standard library only at
import time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List

from gpu_check_common import HERE, Deadline, ratio, read_json, run, tail

#: the sections, in the order they run and are reported
SECTIONS = ["cuda_tests", "train_throughput", "loss_bench", "fsdp", "precision"]

#: section 2's configurations -> bench_step.CONFIGS entries whose plugin flags they join
TRAIN_CONFIGS = {"plain": ["baseline"], "gap": ["gap (atp+cu)"], "gc": ["gc"], "gap+gc": ["gap+gc"],
                 "views": ["gc_aug", "bridge", "sep", "inmodal"], "all": ["all"]}
FSDP_FLAGS = "--gap-atp-weight 1 --gap-cu-weight 1 --gc-weight 0.25"
FSDP_RTOL = 1e-3


# ---- 1. the CUDA tests ------------------------------------------------------------------------

def section_cuda_tests(ctx: Dict, deadline: Deadline) -> Dict:
    xml = os.path.join(ctx["tmp"], "cuda_tests.xml")
    r = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "--junitxml", xml,
             "--continue-on-collection-errors", "tests"], deadline.left())
    if r["timed_out"] or not os.path.exists(xml):
        return {"status": "failed", "error": ("timed out: " if r["timed_out"] else "") + tail(r)}
    cases = ET.parse(xml).getroot().iter("testcase")
    passed, failed, skipped, reasons, uncollected = [], [], [], [], []
    for c in cases:
        name = f"{c.get('classname')}::{c.get('name')}"
        skip, error = c.find("skipped"), c.find("error")
        if error is not None and "collection failure" in (error.get("message") or ""):
            uncollected.append(c.get("name"))  # a test module that cannot be imported here
        elif c.find("failure") is not None or error is not None:
            failed.append(name)
        elif skip is not None:
            skipped.append(name)
            reasons.append(skip.get("message", ""))
        else:
            passed.append(name)
    out = {"passed": len(passed), "failed_tests": failed, "skipped": len(skipped),
           "skip_reasons": sorted(set(reasons)), "collection_errors": uncollected}
    if uncollected:
        out["note"] = f"test modules that could not be imported (their cuda tests, if any, did not run): {uncollected}"
    if failed:
        return {"status": "failed", "error": f"{len(failed)} CUDA tests failed: {failed}\n" + tail(r), **out}
    if not passed and not skipped:
        return {"status": "failed", "error": "no test carries the `cuda` marker\n" + tail(r), **out}
    if not passed:
        return {"status": "skipped", "reason": f"all {len(skipped)} CUDA tests skipped: "
                                               + "; ".join(sorted(set(reasons))), **out}
    return {"status": "ok", **out}


# ---- 2. training throughput through the launcher ------------------------------------------------

LOG_LINE = re.compile(r"Train Epoch: .*Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+),")
LOSS = re.compile(r"(\w+): ([-+0-9.eE]+|nan|inf) \(")


def train_flags() -> Dict[str, List[str]]:
    sys.path.insert(0, HERE)
    from bench_step import CONFIGS  # the same plugin flags as the whole-step benchmark

    return {name: [f for part in parts for f in CONFIGS[part]] for name, parts in TRAIN_CONFIGS.items()}


def train_terms(flags: Dict[str, List[str]]) -> Dict[str, List[str]]:
    """The loss keys each configuration must log: the ``logged`` keys of the registry terms its
    plugin flags enable (``openclip_structure.registry``)."""
    from openclip_structure import flags as plugin_flags, registry

    parser = plugin_flags.add_arguments(argparse.ArgumentParser())
    return {name: [key for spec in registry.enabled(parser.parse_args(argv)) for key in spec.logged]
            for name, argv in flags.items()}


def parse_train_log(text: str, batch: int) -> Dict:
    windows = [(float(d), float(b)) for d, b in LOG_LINE.findall(text)]
    losses = {}
    for line in text.splitlines():
        if "Train Epoch:" in line:
            losses = {k.lower(): float(v) for k, v in LOSS.findall(line.split("Logit Scale:")[-1])}
    # the first windows hold start-up (allocator, kernels, workers); keep at least one
    used = windows[2:] if len(windows) >= 4 else windows[1:] or windows
    if not used:
        return {"windows": 0, "last_losses": losses}
    batch_t = sum(b for _, b in used) / len(used)
    data_t = sum(d for d, _ in used) / len(used)
    return {"windows": len(used), "samples_per_s": batch / batch_t if batch_t > 0 else None,
            "step_ms": 1e3 * batch_t, "data_share": data_t / batch_t if batch_t > 0 else None,
            "last_losses": losses}


def make_digits_shards(tmp: str, timeout: float) -> Dict:
    out = os.path.join(tmp, "digits")
    r = run([sys.executable, os.path.join(HERE, "make_shards.py"), "--source", "digits", "--out", out,
             "--train-shards", "16", "--val-shards", "1"], timeout)
    if r["rc"] != 0:
        raise RuntimeError("make_shards.py failed: " + tail(r))
    return read_json(os.path.join(out, "dataset.json"))["train"]


def section_train(ctx: Dict, deadline: Deadline) -> Dict:
    p = ctx["plan"]["train"]
    flags = train_flags()
    terms = train_terms(flags)
    shards = make_digits_shards(ctx["tmp"], deadline.left())
    results: Dict[str, Dict] = {}
    names = list(TRAIN_CONFIGS)
    for i, name in enumerate(names):
        budget = deadline.left() / (len(names) - i)
        probe = os.path.join(ctx["tmp"], f"train_{name.replace('+', '_')}.json")
        argv = ["--train-data", shards["pattern"], "--dataset-type", "webdataset", "--dataset-resampled",
                "--train-num-samples", str(p["batch"] * p["steps"]),
                "--batch-size", str(p["batch"]), "--epochs", "1", "--model", p["model"], "--precision", "amp_bf16",
                "--workers", str(p["workers"]), "--log-every-n-steps", str(p["log_every"]), "--logs", "none",
                "--lr", "2e-4", "--warmup", "10", "--seed", "0"] + flags[name]
        # open_clip writes none/<name>/{out.log,params.txt} even with --logs none (no checkpoint
        # then): run in the scratch folder so nothing lands in the checkout
        r = run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--train-probe", probe, "--"] + argv, budget,
                cwd=ctx["tmp"])
        entry = parse_train_log(r["out"] + r["err"], p["batch"])
        entry.update(wall_s=round(r["wall_s"], 1), flags=flags[name], truncated=r["timed_out"])
        if os.path.exists(probe):
            entry.update(read_json(probe))
        missing = [k for k in terms[name] if k not in entry["last_losses"]]
        if r["rc"] not in (0, None) or not entry["windows"] or missing:
            entry["error"] = (f"terms not logged: {missing}\n" if missing else "") + tail(r)
        results[name] = entry
    base = results["plain"]
    for e in results.values():
        e["throughput_ratio"] = ratio(e.get("samples_per_s"), base.get("samples_per_s"))
        e["peak_mem_ratio"] = ratio(e.get("peak_mem_mb"), base.get("peak_mem_mb"))
    out = {"model": p["model"], "batch": p["batch"], "steps": p["steps"], "precision": "amp_bf16",
           "data": f"bundled digits, webdataset, resampled ({shards['num_samples']} samples)", "configs": results}
    bad = {n: e["error"] for n, e in results.items() if "error" in e}
    if bad:
        return {"status": "failed", "error": "; ".join(f"{n}: {m[-600:]}" for n, m in bad.items()), **out}
    slow_data = [n for n, e in results.items() if (e.get("data_share") or 0) > 0.2]
    if slow_data:
        out["note"] = f"data loading took > 20% of the step time in {slow_data}: those ratios understate the cost"
    return {"status": "ok", **out}


def train_probe(result: str, argv: List[str]) -> int:
    """Run the launcher in this process, then record its peak memory (CUDA allocator or RSS)."""
    import torch

    from openclip_structure.main import main as launcher_main

    launcher_main(argv)
    if torch.cuda.is_available():
        rec = {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2 ** 20,
               "peak_reserved_mb": torch.cuda.max_memory_reserved() / 2 ** 20,
               "peak_mem_method": "torch.cuda.max_memory_allocated"}
    else:
        rec = {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "peak_mem_method": "process peak RSS (ru_maxrss; no CUDA)"}
    with open(result, "w") as f:
        json.dump(rec, f)
    return 0


# ---- 3. loss-only benchmark ----------------------------------------------------------------------

def section_loss_bench(ctx: Dict, deadline: Deadline) -> Dict:
    out: Dict = {"precisions": {}}
    runs = ctx["plan"]["loss_bench"]
    for i, (precision, extra) in enumerate(runs.items()):
        path = os.path.join(ctx["tmp"], f"loss_bench_{precision}.json")
        r = run([sys.executable, os.path.join(HERE, "bench_losses.py"), "--json", path] + extra,
                deadline.left() / (len(runs) - i))
        if r["rc"] != 0 or not os.path.exists(path):
            return {"status": "failed", "error": f"{precision}: " + ("timed out: " if r["timed_out"] else "") + tail(r),
                    **out}
        res = read_json(path)
        configs = []
        for cfg in res["configs"]:
            clip = cfg["cases"]["clip"]
            configs.append({"B_local": cfg["B_local"], "world": cfg["world"], "B_global": cfg["B_global"],
                            "D": cfg["D"], "clip_ms": clip["ms"], "clip_peak_mb": clip.get("peak_mb"),
                            "cases": {n: {"time_ratio": e["ratio"],
                                          "peak_mem_ratio": ratio(e.get("peak_mb"), clip.get("peak_mb"))}
                                      for n, e in cfg["cases"].items() if n != "clip"}})
        out["precisions"][precision] = {"dtype": res["machine"]["dtype"], "clock": res["clock"],
                                        "peak_memory_method": res.get("peak_memory_method"), "configs": configs}
        out["device"] = res["machine"]["device"]
    return {"status": "ok", **out}


# ---- 4. FSDP2 vs DDP ---------------------------------------------------------------------------------

def fsdp_launch(ctx: Dict, deadline: Deadline, nproc: int, modes: str, share: bool, cap: float = math.inf) -> Dict:
    p = ctx["plan"]["fsdp"]
    path = os.path.join(ctx["tmp"], f"fsdp_{nproc}.json")
    cmd = [sys.executable, os.path.join(HERE, "bench_fsdp.py"), "--nproc", str(nproc), "--modes", modes,
           "--model", p["model"], "--batch", str(p["batch"] // nproc), "--steps", str(p["steps"]),
           "--lr", str(p["lr"]), "--device", ctx["device"], "--plugin-flags=" + FSDP_FLAGS, "--json", path]
    r = run(cmd + (["--share-device"] if share else []), min(cap, deadline.left()))
    r["results"] = read_json(path) if r["rc"] == 0 and os.path.exists(path) else None
    return r


def section_fsdp(ctx: Dict, deadline: Deadline) -> Dict:
    one = fsdp_launch(ctx, deadline, 1, "ddp,fsdp", share=False)
    if one["results"] is None:
        return {"status": "failed", "error": ("timed out: " if one["timed_out"] else "") + tail(one, 3000)}
    runs = {f"{r['mode']}_{r['world_size']}rank": r for r in one["results"]}
    ref = runs["ddp_1rank"]["ranks"][0]["losses"]
    # NCCL refuses two ranks on one GPU at its first collective: 60 s is plenty to find out
    two = fsdp_launch(ctx, deadline, 2, "fsdp", share=ctx["device"] == "cuda", cap=60)
    two_ranks: Dict = {}
    if two["results"] is not None:
        runs.update({f"{r['mode']}_{r['world_size']}rank": r for r in two["results"]})
        two_ranks = {"status": "ok"}
    else:
        text = two["out"] + two["err"]
        refused = re.search(r"Duplicate GPU detected[^\n]*|ncclInvalidUsage[^\n]*", text)
        if refused:
            two_ranks = {"status": "skipped", "reason": f"NCCL refuses two ranks on one GPU: {refused.group(0).strip()}"}
        else:
            two_ranks = {"status": "failed", "error": ("timed out: " if two["timed_out"] else "") + tail(two, 3000)}
    out = {"model": ctx["plan"]["fsdp"]["model"], "plugin_flags": FSDP_FLAGS, "reference": "ddp_1rank",
           "reference_losses": ref, "two_ranks": two_ranks, "runs": {}}
    problems = []
    if not abs(ref[-1] - ref[0]) > 20 * FSDP_RTOL * abs(ref[0]):
        problems.append(f"the reference loss barely moved ({ref}): the comparison would say nothing")
    for name, r in runs.items():
        losses = r["ranks"][0]["losses"]
        diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses, ref)) if len(losses) == len(ref) else math.inf
        rec = {"losses": losses, "max_rel_diff": diff, "step_s": r["ranks"][0]["step_s"],
               "peak_mem_mb": r["ranks"][0].get("cuda_peak_mb", r["ranks"][0].get("train_peak_rss_mb"))}
        out["runs"][name] = rec
        if not diff <= FSDP_RTOL:
            problems.append(f"{name} trajectory differs from DDP's by {diff:.2e} (relative)")
    if two_ranks["status"] == "failed":
        problems.append("two ranks: " + two_ranks["error"][-800:])
    if problems:
        return {"status": "failed", "error": "; ".join(problems), **out}
    return {"status": "ok", **out}


# ---- 5. precision --------------------------------------------------------------------------------

def section_precision(ctx: Dict, deadline: Deadline) -> Dict:
    path = os.path.join(ctx["tmp"], "precision.json")
    r = run([sys.executable, os.path.join(HERE, "check_precision.py"), "--json", path] + ctx["plan"]["precision"],
            deadline.left())
    if not os.path.exists(path):
        return {"status": "failed", "error": ("timed out: " if r["timed_out"] else "") + tail(r)}
    res = read_json(path)
    runs = [{k: x[k] for k in ("config", "precision", "ok", "problems", "total_first_third", "total_last_third",
                               "scaler_skipped_steps")} for x in res["runs"]]
    bad = [f"{x['precision']}/{x['config']}: {'; '.join(x['problems'])}" for x in runs if not x["ok"]]
    out = {"model": res["model"], "steps": res["steps"], "batch": res["batch"], "runs": runs}
    if r["timed_out"]:
        bad.append(f"cut off by the section's cap after {len(runs)} of {res['planned_runs']} runs")
    if bad or r["rc"] != 0:
        return {"status": "failed", "error": "; ".join(bad) or tail(r), **out}
    return {"status": "ok", **out}


RUNNERS: Dict[str, Callable[[Dict, Deadline], Dict]] = {
    "cuda_tests": section_cuda_tests, "train_throughput": section_train, "loss_bench": section_loss_bench,
    "fsdp": section_fsdp, "precision": section_precision}
