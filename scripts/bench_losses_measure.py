"""The measurements of the loss-only benchmark (``bench_losses.py``, whose docstring describes the
method): the features of one configuration and the simulated data-parallel gathers
(:class:`Setup`), the paired timings of every case, their peak memory and saved-for-backward bytes.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_common import median  # noqa: E402
from bench_losses_cases import CASES  # noqa: E402
from bench_memory import PeakRSS, saved_bytes_counter  # noqa: E402
from openclip_structure.losses import runtime as osd  # noqa: E402
from openclip_structure.factory import StructureLoss  # noqa: E402
from openclip_structure.schedule import constant  # noqa: E402


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
        """Patch the gathers and the statistics all-reduce (see ``bench_losses.py``'s docstring)."""
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
    """Times of every case of one configuration (see ``bench_losses.py``'s docstring for the
    pairing)."""
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
