"""Loss-only benchmark: forward + backward of every regularizer (alone and all together) against
open_clip's own ``ClipLoss`` on the same features, in the same process, interleaved.

    python scripts/bench_losses.py --threads 1     # the grid below, ~6 min on 2 shared CPU cores
    python scripts/bench_losses.py --quick         # tiny smoke run (seconds)
    python scripts/bench_losses.py --scaling       # time/peak memory vs B_global -> docs/scaling.png
    python scripts/bench_losses.py --json out.json # also write every number as JSON ('-' = stdout)
    python scripts/bench_losses.py --device cuda --b-local 256 1024 --world 8 64   # on a GPU

Grid: B_local in {256, 1024} x simulated world size in {1, 8} x D in {512, 1024}, float32.
Results and discussion: docs/performance.md.

Data parallelism is SIMULATED in one process, exactly as each rank computes it: the features of
the other W-1 ranks are fixed tensors, and the "gather" (open_clip's ``gather_features`` for
``ClipLoss(local_loss=True, gather_with_grad=True)``, ``openclip_structure.losses.runtime.
_gather_with_grad`` for the regularizers) returns ``cat([others before, local rows, others after])``
so gradients flow into the local rows as with torch.distributed.nn's gather; the statistics
all-reduce is replaced by ``x *= W`` (what it would give for identically distributed ranks). Network
time is NOT included (ClipLoss gathers 2 tensors of [B_global, D]; the regularizers gather each
key they use once, shared by all terms; geometric consistency needs no gather in its Gram form but
all-reduces D x D statistics).

The cases come from the term registry (``bench_losses_cases.build_cases``: every term alone, a
few option variants, the gap loss, the no-view terms, all of them). Each case runs through the real
``StructureLoss.regularizer_losses`` path (FeatureBatch, one
gather per key, statistics, ONE reduce, finalize) with every weight 1; the baseline is
``ClipLoss(...)`` forward + backward. Each repetition runs ClipLoss, case, ClipLoss, case, ... in a
shuffled case order; a case's ratio is the median over repetitions of its time divided by the mean
of the two ClipLoss runs around it (paired, so drift and load bursts of other processes on a shared
machine cancel); times shown are medians. Wall and process-CPU time are both recorded; the
headline ratios use CPU time with 1 torch thread (robust to other jobs on the cores), wall time
otherwise (``--clock``).

``--amp-bf16``: the features are bfloat16 and every forward runs under bf16 autocast, as in
training with ``--precision amp_bf16`` (ClipLoss's logits matmul then runs in bf16; the
regularizers convert to float32 outside autocast, as they always do). On ``--device cuda`` the
features live on the GPU, every timed call is bracketed by
``torch.cuda.synchronize()``, the headline ratios use wall time, and ``peak`` is
``torch.cuda.max_memory_allocated()`` over one fwd+bwd minus the memory allocated before it.

Memory, per case, from one fwd+bwd after all timings: ``peak``: the peak increase of resident
memory (see ``bench_memory.PeakRSS``: every tensor > 64 KiB is its own mmap, so this is the peak
of live tensor memory) and ``saved``: bytes of the tensors autograd keeps for backward (unique
storages, via ``torch.autograd.graph.saved_tensors_hooks``); both also in units of one B_local x
B_global float32 matrix (``L``), the size of one logits matrix of ClipLoss.

The code: ``bench_losses_cases.py`` (the cases), ``bench_losses_measure.py`` (the simulated data
parallelism and the measurements), ``bench_losses_report.py`` (tables and the scaling plot),
``bench_memory.py`` (peak memory, saved-for-backward bytes); this file is the command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench_common import describe, finish, machine_info  # noqa: E402
from bench_losses_cases import CASES  # noqa: E402
from bench_losses_measure import bench_config, memory_config, set_ratio  # noqa: E402
from bench_losses_report import scaling_plot, summary_table, table  # noqa: E402
from bench_memory import PeakRSS  # noqa: E402


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 1 repetition: a smoke check in seconds")
    p.add_argument("--scaling", action="store_true", help="time and peak memory vs B_global; writes --plot")
    p.add_argument("--json", default=None, help="write results as JSON to this path ('-' = stdout, tables to stderr)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions per configuration")
    p.add_argument("--min-time", type=float, default=None, help="seconds per measurement (calls are repeated)")
    p.add_argument("--b-local", type=int, nargs="*", default=None)
    p.add_argument("--world", type=int, nargs="*", default=None)
    p.add_argument("--dim", type=int, nargs="*", default=None)
    p.add_argument("--cases", nargs="*", default=None, help=f"subset of {list(CASES)}")
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "scaling.png"))
    p.add_argument("--plot-from", default=None, metavar="JSON", help="only redraw --plot from a --scaling --json file")
    p.add_argument("--max-global", type=int, default=65536, help="largest B_global of --scaling")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own; 1 with --quick)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="time behind the headline ratios: process CPU time (robust on a shared machine, "
                        "meaningful with 1 thread) or wall time; auto = cpu with 1 torch thread on CPU, "
                        "else wall (always wall on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (features, losses and memory there)")
    p.add_argument("--amp-bf16", action="store_true",
                   help="bf16 features, forwards under bf16 autocast (as --precision amp_bf16 trains)")
    args = p.parse_args(argv)
    device = args.device
    if args.amp_bf16 and args.scaling:
        p.error("--scaling measures float32 only; leave out --amp-bf16")
    if device != "cpu":
        if not device.startswith("cuda") or not torch.cuda.is_available():
            p.error(f"--device {device}: only cpu or an available CUDA device (cuda, cuda:N) is supported")
        if args.scaling:
            p.error("--scaling runs on CPU only (it draws docs/scaling.png)")
    if args.threads or args.quick:  # quick: 1 thread, robust to other load on the machine
        torch.set_num_threads(args.threads or 1)
    clock = args.clock if args.clock != "auto" else (
        "cpu" if torch.get_num_threads() == 1 and device == "cpu" else "wall")
    if device != "cpu" and clock == "cpu":
        p.error("--clock cpu measures host CPU time, not GPU work: use --clock wall with --device cuda")
    if args.plot_from:
        with open(args.plot_from) as f:
            scaling_plot(json.load(f), args.plot)
        return {}
    stream = sys.stderr if args.json == "-" else sys.stdout

    def log(*a):
        print(*a, file=stream, flush=True)

    info = machine_info(device)
    log(describe(info) + f"; headline ratios from {clock} time")
    cases = args.cases or list(CASES)
    info["dtype"] = "bfloat16 features, bf16 autocast" if args.amp_bf16 else "float32"
    res: Dict[str, object] = {"machine": info, "cases": cases, "configs": [], "clock": clock}
    t_start = time.time()
    if args.scaling:
        b_local = (args.b_local or [1024])[0]
        dim = (args.dim or [512])[0]
        if not args.cases:
            cases = ["gap_cu", "gc", "gc_aug", "sep_iuni", "inmodal", "no-view (gap+gc)", "all"]
        res.update(mode="scaling", cases=cases, B_local=b_local, D=dim)
        n = 256 if not args.quick else 32
        sizes = []
        while n <= (args.max_global if not args.quick else 256):
            sizes.append(n)
            n *= 2
        for ng in sizes:
            bl = min(b_local, ng)
            reps = args.reps or (3 if ng <= 8192 else 1)
            cfg = bench_config(bl, ng // bl, dim, cases, reps, args.min_time or (0.01 if args.quick else 0.2),
                               warmup=ng <= 8192)
            res["configs"].append(cfg)
            log(f"B_global={ng}: timed ({time.time() - t_start:.0f} s)")
    else:
        if args.quick:
            grid = [(64, 1, 64), (64, 4, 64)]
            reps, min_time = args.reps or 1, args.min_time or 0.0
        else:
            grid = [(bl, w, d) for bl in (args.b_local or [256, 1024]) for w in (args.world or [1, 8])
                    for d in (args.dim or [512, 1024])]
            reps, min_time = args.reps or 4, args.min_time if args.min_time is not None else 0.05
        res["mode"] = "quick" if args.quick else "grid"
        for bl, w, d in grid:
            res["configs"].append(bench_config(bl, w, d, cases, reps, min_time, device=device, amp=args.amp_bf16))
            log(f"B_local={bl} world={w} D={d}: timed ({time.time() - t_start:.0f} s)")
    set_ratio(res, clock)
    # memory last (see memory_config)
    rss = PeakRSS() if device == "cpu" else None
    if rss is None:
        res["peak_memory_method"] = "torch.cuda.max_memory_allocated over one fwd+bwd minus the memory allocated before"
    else:
        res["peak_memory_method"] = ("peak RSS increase over one fwd+bwd, glibc mmap threshold pinned at 64 KiB"
                                     if rss.available else "unavailable")
    for cfg in res["configs"]:
        memory_config(cfg, rss, with_saved=not args.scaling, device=device, amp=args.amp_bf16)
        log(table(cfg) + "\n")
    if args.scaling:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        scaling_plot(res, args.plot)
        log(f"wrote {args.plot}")
    else:
        log(summary_table(res["configs"], cases))
    log("")
    return finish(res, t_start, args.json, log)


if __name__ == "__main__":
    main()
