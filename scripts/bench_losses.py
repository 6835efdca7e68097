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

The cases come from the term registry (:func:`build_cases`: every term alone, a few option
variants, the gap loss, the no-view terms, all of them). Each case runs through the real
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
memory (see :class:`PeakRSS`: every tensor > 64 KiB is its own mmap, so this is the peak of live
tensor memory) and ``saved``: bytes of the tensors autograd keeps for backward (unique storages,
via ``torch.autograd.graph.saved_tensors_hooks``); both also in units of one B_local x B_global
float32 matrix (``L``), the size of one logits matrix of ClipLoss.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_common import describe, finish, machine_info, median  # noqa: E402
from openclip_structure import flags as plugin_flags, registry  # noqa: E402
from openclip_structure.losses import runtime as osd  # noqa: E402
from openclip_structure.factory import StructureLoss  # noqa: E402
from openclip_structure.schedule import constant  # noqa: E402


# ---- memory helpers --------------------------------------------------------------------------

class PeakRSS:
    """Peak increase of resident memory over a block (Linux).

    torch's CPU allocator keeps no peak counter. With glibc's mmap threshold pinned at 64 KiB,
    every tensor above that size is its own ``mmap``, returned to the OS when freed, and
    ``malloc_trim`` gives free heap memory back before the block, so the peak RSS (``VmHWM``, reset
    through ``/proc/self/clear_refs``) minus the RSS at the start of the block is the peak of live
    tensor memory in the block (plus allocator noise of a few 100 KiB).
    ``available`` is False elsewhere (values are then NaN).
    """

    def __init__(self):
        self.available = False
        self.start = 0
        try:
            libc = self._libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, disables the dynamic threshold
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.available = bool(ok)
        except (OSError, AttributeError):
            self.available = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def reset(self) -> None:
        if self.available:
            # give free heap memory back first: a freed chunk reused from the heap would not raise
            # the RSS (its pages are faulted in again, and counted, when touched after the trim)
            self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._status("VmRSS")

    def peak(self) -> float:
        return float(self._status("VmHWM") - self.start) if self.available else float("nan")


@contextlib.contextmanager
def saved_bytes_counter(out: Dict[str, int]):
    """Sum of the bytes of unique storages autograd saves for backward inside the block."""
    seen = set()
    out["bytes"] = 0

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            nbytes = t.untyped_storage().nbytes()
        except Exception:  # pragma: no cover
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            out["bytes"] += nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


# ---- the cases ------------------------------------------------------------------------------
#
# Every case is built from the term registry (openclip_structure.registry.TERMS) as training builds
# it, from the plugin's own flag defaults (e.g. --sep-temperature, --bridge-t), with a text view on
# (``--text-aug eda``: the in-modal terms build with their text halves). A case feeds ``text_aug`` =
# ``text`` (no distinct augmented caption, as training without a text view) unless it says otherwise.

#: variants of one registry term: case name -> (term key, extra plugin flags, distinct augmented caption)
VARIANTS: Dict[str, Tuple[str, List[str], bool]] = {
    "gap_cu(modality)": ("gap_cu", ["--gap-uniformity", "modality"], False),
    "gc_aug(text-aug)": ("gc_aug", [], True),
}


def term_args(extra: Optional[List[str]] = None) -> argparse.Namespace:
    """The plugin's flags at their defaults, every term's weight 1, a text view, plus ``extra``."""
    argv = registry.weight_flags(default=1) + ["--text-aug", "eda"] + (extra or [])
    return plugin_flags.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def _built(specs, extra: Optional[List[str]] = None, name: Optional[str] = None) -> Callable[[], list]:
    """Factory of the terms ``specs`` build (only the one called ``name`` when given)."""
    args = term_args(extra)
    return lambda: [t for spec in specs for t in spec.build(args) if name is None or t.name == name]


def build_cases() -> Dict[str, Tuple[Callable[[], list], bool]]:
    """Case name -> (terms factory, uses an augmented caption distinct from the caption): each
    registry term alone (a term that adds several, e.g. separation, as one case per added term,
    named as logged), the :data:`VARIANTS` after their term, then the gap loss (the terms
    ``--gap-schedule`` ramps), the terms that need no view, and all of them together."""
    cases: Dict[str, Tuple[Callable[[], list], bool]] = {}
    for spec in registry.TERMS:
        names = [t.name for t in spec.build(term_args())]
        for name in names:
            cases[spec.key if len(names) == 1 else name] = (_built([spec], name=name), False)
        for variant, (key, extra, text_aug) in VARIANTS.items():
            if key == spec.key:
                cases[variant] = (_built([spec], extra), text_aug)
    gap = [s for s in registry.TERMS if s.gap_schedule]
    no_view = [s for s in registry.TERMS if not s.views and not s.heads]
    cases[f"gap ({'+'.join(s.key.split('_', 1)[-1] for s in gap)})"] = (_built(gap), False)  # gap (atp+cu)
    groups = dict.fromkeys("gap" if s.gap_schedule else s.key for s in no_view)
    cases[f"no-view ({'+'.join(groups)})"] = (_built(no_view), False)  # no-view (gap+gc)
    cases["all"] = (_built(registry.TERMS), False)
    return cases


#: case name -> (terms factory, uses an augmented caption distinct from the caption)
CASES: Dict[str, Tuple[Callable[[], list], bool]] = build_cases()
#: the cases of one term each (every case but the combinations)
SINGLE_TERMS = [n for n in CASES if n != "all" and not n.startswith(("gap (", "no-view ("))]


KEYS = ["image", "text", "image_aug", "text_aug", "image_ind", "text_ind", "image_aug_ind", "text_aug_ind"]


class Setup:
    """Features of one (B_local, W, D) configuration and the simulated gathers."""

    def __init__(self, b_local: int, world: int, dim: int, seed: int = 0, device: str = "cpu", amp: bool = False):
        self.b_local, self.world, self.dim = b_local, world, dim
        self.device = torch.device(device)
        self.amp = amp
        self.n_global = b_local * world
        self.rank = world // 2  # a middle rank: other ranks' rows on both sides
        self.offset = self.rank * b_local
        g = torch.Generator(device=self.device).manual_seed(seed)
        base = F.normalize(torch.randn(self.n_global, dim, generator=g, device=self.device), dim=-1)

        def near(x, s):  # correlated modalities/views, as real embeddings are
            return F.normalize(x + s * torch.randn(x.shape, generator=g, device=self.device), dim=-1)

        glob = {"image": base, "text": near(base, 1.0)}
        glob["image_aug"] = near(glob["image"], 0.5)
        glob["text_aug"] = near(glob["text"], 0.3)
        for k in ("image", "text", "image_aug", "text_aug"):
            glob[k + "_ind"] = near(glob[k], 2.0)
        # other ranks' rows as each gather receives them: the terms gather float32 (they convert
        # first); with amp, open_clip's ClipLoss gathers the model's bf16 output
        self.glob32 = glob
        if amp:
            glob = {k: v.to(torch.bfloat16) for k, v in glob.items()}
        self.glob = glob
        self.local = {k: v[self.offset:self.offset + b_local].clone().requires_grad_() for k, v in glob.items()}
        self.log_scale = torch.tensor(math.log(1 / 0.07), device=self.device, requires_grad=True)
        self._by_id: Dict[int, str] = {}

    def gathered(self, x: torch.Tensor, key: Optional[str] = None) -> torch.Tensor:
        if key is None:
            leaf = x
            if id(x) not in self._by_id and x.grad_fn is not None:  # a float32 copy of a bf16 leaf (amp)
                leaf = x.grad_fn.next_functions[0][0].variable
            key = self._by_id[id(leaf)]
        g = self.glob[key] if x.dtype == self.glob[key].dtype else self.glob32[key]
        return torch.cat([g[:self.offset], x, g[self.offset + self.b_local:]], dim=0)

    def zero_grad(self) -> None:
        for t in list(self.local.values()) + [self.log_scale]:
            t.grad = None

    def sync(self) -> None:
        """Wait for queued GPU work (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def simulated_distributed(self):
        """Patch the gathers and the statistics all-reduce (see the module docstring)."""
        import open_clip.loss as ocl

        orig_gather, orig_oc_gather, orig_all_reduce = osd._gather_with_grad, ocl.gather_features, osd.dist.all_reduce
        world = self.world

        def oc_gather(image_features, text_features, **kw):
            return self.gathered(image_features, "image"), self.gathered(text_features, "text")

        def all_reduce(t, *a, **kw):
            t.mul_(world)

        osd._gather_with_grad = self.gathered
        ocl.gather_features = oc_gather
        osd.dist.all_reduce = all_reduce
        try:
            yield
        finally:
            osd._gather_with_grad, ocl.gather_features, osd.dist.all_reduce = orig_gather, orig_oc_gather, orig_all_reduce

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def runner(self, case: str) -> Callable[[], None]:
        """fwd+bwd of one case (``"clip"`` = open_clip's ClipLoss); forward under autocast with
        ``amp``, backward outside it (as open_clip_train does)."""
        from open_clip.loss import ClipLoss

        clip = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                        rank=self.rank, world_size=self.world)
        if case == "clip":
            def run():
                with self.autocast():
                    out = clip(self.local["image"], self.local["text"], self.log_scale.exp())
                out.backward()
            return run
        factory, text_aug = CASES[case]
        loss = StructureLoss(clip, [(t, constant(1.0)) for t in factory()], rank=self.rank, world_size=self.world)
        keys = [k for k in KEYS if text_aug or k not in ("text_aug", "text_aug_ind")]
        feats = {k: self.local[k] for k in keys}
        # the regularizers gather by tensor identity (aliases text_aug -> text keep the same tensor)
        self._by_id.update({id(self.local[k]): k for k in keys})

        def run():
            with self.autocast():
                out = loss.regularizer_losses(feats, logit_scale=self.log_scale.exp())
            sum(out.values()).backward()
        return run


def measure_case(setup: Setup, run: Callable[[], None], inner: int) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) per fwd+bwd, from ``inner`` back-to-back calls."""
    setup.zero_grad()
    setup.sync()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(inner):
        run()
        setup.zero_grad()
    setup.sync()
    return (time.perf_counter() - t0) / inner, (time.process_time() - c0) / inner


def saved_bytes(setup: Setup, run: Callable[[], None]) -> int:
    counter: Dict[str, int] = {}
    setup.zero_grad()
    with saved_bytes_counter(counter):
        run()
    setup.zero_grad()
    return counter["bytes"]


def bench_config(b_local: int, world: int, dim: int, cases: List[str], reps: int, min_time: float,
                 seed: int = 0, warmup: bool = True, device: str = "cpu", amp: bool = False) -> Dict[str, object]:
    """Times of every case of one configuration (see the module docstring for the pairing)."""
    setup = Setup(b_local, world, dim, seed=seed, device=device, amp=amp)
    names = ["clip"] + cases
    with setup.simulated_distributed():
        runs = {n: setup.runner(n) for n in names}
        if warmup:
            for n in names:  # warm-up (and lazy init) of every case
                runs[n]()
                setup.zero_grad()
        t_clip = min(measure_case(setup, runs["clip"], 1)[0] for _ in range(2 if warmup else 1))
        inner = max(1, int(math.ceil(min_time / max(t_clip, 1e-6))))
        wall: Dict[str, List[float]] = {n: [] for n in names}
        cpu: Dict[str, List[float]] = {n: [] for n in names}
        pair_wall: Dict[str, List[float]] = {n: [] for n in names}
        pair_cpu: Dict[str, List[float]] = {n: [] for n in names}
        rng = random.Random(seed)

        def measure(n):
            dt, dc = measure_case(setup, runs[n], inner)
            wall[n].append(dt)
            cpu[n].append(dc)
            return dt, dc

        for _ in range(reps):
            # ClipLoss, case, ClipLoss, case, ... (cases shuffled): each case is compared with the
            # mean of the ClipLoss runs right before and after it, which cancels drift and bursts
            # of load from other processes on a shared machine
            order = list(cases)
            rng.shuffle(order)
            before = measure("clip")
            for n in order:
                dt, dc = measure(n)
                after = measure("clip")
                pair_wall[n].append(dt / (0.5 * (before[0] + after[0])))
                pair_cpu[n].append(dc / (0.5 * (before[1] + after[1])))
                before = after
    out = {"B_local": b_local, "world": world, "B_global": setup.n_global, "D": dim, "reps": reps,
           "inner": inner, "unit_bytes": b_local * setup.n_global * 4, "cases": {}}
    for n in names:
        out["cases"][n] = {
            "ms": 1e3 * median(wall[n]), "cpu_ms": 1e3 * median(cpu[n]),
            "ratio_wall": 1.0 if n == "clip" else median(pair_wall[n]),
            "ratio_cpu": 1.0 if n == "clip" else median(pair_cpu[n]),
            "ratio_wall_all": pair_wall[n], "ratio_cpu_all": pair_cpu[n],
            "ms_all": [1e3 * x for x in wall[n]]}
    return out


def memory_config(cfg: Dict[str, object], rss: Optional[PeakRSS], with_saved: bool = True, seed: int = 0,
                  device: str = "cpu", amp: bool = False) -> None:
    """Add peak memory (and saved-for-backward bytes) of one fwd+bwd of every case to ``cfg``.

    Run after all timings: pinning glibc's mmap threshold (see :class:`PeakRSS`) makes every large
    allocation a fresh mmap with page faults, which would distort the times. On CUDA (``rss``
    None) the peak is the allocator's ``max_memory_allocated`` minus what was allocated before."""
    setup = Setup(cfg["B_local"], cfg["world"], cfg["D"], seed=seed, device=device, amp=amp)
    unit = cfg["unit_bytes"]
    with setup.simulated_distributed():
        for n, entry in cfg["cases"].items():
            run = setup.runner(n)
            run()  # lazy init outside the measurement
            setup.zero_grad()
            if rss is None:
                setup.sync()
                torch.cuda.reset_peak_memory_stats(setup.device)
                before = torch.cuda.memory_allocated(setup.device)
                run()
                setup.sync()
                peak = float(torch.cuda.max_memory_allocated(setup.device) - before)
            else:
                rss.reset()
                run()
                peak = rss.peak()
            setup.zero_grad()
            entry.update(peak_mb=peak / 2 ** 20, peak_units=peak / unit)
            if with_saved:
                b = saved_bytes(setup, run)
                entry.update(saved_mb=b / 2 ** 20, saved_units=b / unit)


def set_ratio(res: Dict[str, object], clock: str) -> None:
    """``ratio`` (the headline number) from the chosen clock."""
    res["clock"] = clock
    for cfg in res["configs"]:
        cfg["clock"] = clock
        for e in cfg["cases"].values():
            e["ratio"] = e["ratio_cpu"] if clock == "cpu" else e["ratio_wall"]


# ---- output ---------------------------------------------------------------------------------

def table(cfg: Dict[str, object]) -> str:
    head = (f"B_local={cfg['B_local']} world={cfg['world']} (B_global={cfg['B_global']}) D={cfg['D']} "
            f"[{cfg['reps']} reps x {cfg['inner']} calls; L = one {cfg['B_local']}x{cfg['B_global']} fp32 "
            f"matrix = {cfg['unit_bytes'] / 2 ** 20:.1f} MiB]")
    has_saved = "saved_mb" in next(iter(cfg["cases"].values()))
    lines = [head, "",
             "| case | wall ms | x ClipLoss (wall) | CPU ms | x ClipLoss (CPU) | peak MiB | peak / L |"
             + (" saved MiB | saved / L |" if has_saved else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if has_saved else "")]
    for n, e in cfg["cases"].items():
        name = "ClipLoss (open_clip, local_loss)" if n == "clip" else n
        row = (f"| {name} | {e['ms']:.2f} | {e['ratio_wall']:.2f} | {e['cpu_ms']:.2f} | {e['ratio_cpu']:.2f} | "
               f"{e.get('peak_mb', float('nan')):.1f} | {e.get('peak_units', float('nan')):.2f} |")
        if has_saved:
            row += f" {e['saved_mb']:.1f} | {e['saved_units']:.2f} |"
        lines.append(row)
    return "\n".join(lines)


def summary_table(configs: List[Dict[str, object]], cases: List[str]) -> str:
    heads = [f"{c['B_local']}x{c['world']} D{c['D']}" for c in configs]
    clock = configs[0].get("clock", "wall") if configs else "wall"
    lines = [f"ratio to ClipLoss (fwd+bwd, median {clock} time), columns: B_local x world, D", "",
             "| case | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    key = "cpu_ms" if clock == "cpu" else "ms"
    lines.append(f"| ClipLoss {clock} ms | " + " | ".join(f"{c['cases']['clip'][key]:.1f}" for c in configs) + " |")
    for n in cases:
        lines.append(f"| {n} | " + " | ".join(f"{c['cases'][n]['ratio']:.2f}" for c in configs) + " |")
    return "\n".join(lines)


def scaling_plot(res: Dict[str, object], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = res["configs"]
    ng = [c["B_global"] for c in configs]
    cases = ["clip"] + res["cases"]
    key = "cpu_ms" if res.get("clock") == "cpu" else "ms"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for n in cases:
        label = "ClipLoss (open_clip)" if n == "clip" else n
        style = dict(lw=2.5, color="black") if n == "clip" else dict(lw=1.5)
        axes[0].loglog(ng, [c["cases"][n][key] for c in configs], "o-", label=label, **style)
        axes[1].loglog(ng, [max(c["cases"][n]["peak_mb"], 1e-2) for c in configs], "o-", label=label, **style)
    # reference: the logits matmul, O(B_local x B_global x D) time and O(B_local x B_global) memory
    ref_t = [configs[-1]["cases"]["clip"][key] * (c["B_local"] * c["B_global"]) /
             (configs[-1]["B_local"] * configs[-1]["B_global"]) for c in configs]
    axes[0].loglog(ng, ref_t, "k:", label="∝ B_local·B_global (logits matmul)")
    axes[1].loglog(ng, [c["unit_bytes"] / 2 ** 20 for c in configs], "k:", label="one B_local×B_global fp32 matrix")
    axes[0].set_title(f"forward+backward time ({'process CPU' if key == 'cpu_ms' else 'wall'})")
    axes[0].set_ylabel("ms")
    axes[1].set_title("peak extra memory (resident)")
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_xlabel(f"B_global (B_local = min(B_global, {res['B_local']}), D = {res['D']})")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left")
    threads = res['machine']['torch_threads']
    fig.suptitle(f"Loss fwd+bwd vs global batch (simulated data parallelism), fp32, {res['machine']['cpu']}, "
                 f"{threads} torch thread{'s' if threads != 1 else ''}, torch {res['machine']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
