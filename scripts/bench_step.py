"""Whole-training-step benchmark: samples/s of an open_clip training step (model forward, loss,
backward, AdamW step, logit-scale clamp, as open_clip_train does it) with each regularizer vs
without, same model and data, in one process, configurations interleaved.

    python scripts/bench_step.py --threads 1   # structure-tiny and a ViT/512-d "small" model, ~8-9 min
    python scripts/bench_step.py --quick    # structure-tiny, a few steps: smoke check (seconds)
    python scripts/bench_step.py --json out.json

Every configuration gets its own model built from the same seed, its own AdamW, and the loss from
``openclip_structure.factory.create_loss(args)`` with ``args`` parsed from the plugin's flags (plus
open_clip's own fields); the two-view terms use the launcher's wiring
(``openclip_structure.integration.model.prepare_model``: one image-tower forward of 2B images, separation heads).
Data: fixed random images and captions (no data loading in the timing). fp32, CPU.

Reported per configuration: samples/s (median over repetitions) and the throughput ratio to the
baseline (open_clip's ClipLoss alone): each repetition runs baseline, configuration, baseline,
configuration, ... in a shuffled order, and a configuration's ratio is the median over repetitions
of the mean of the two baseline step times around it divided by its own (paired, so drift and load
bursts of other processes on a shared machine cancel). Times are process CPU time with 1 torch
thread (``--threads 1``; robust to other processes sharing the cores) or wall time otherwise
(``--clock``); with 1 thread, samples per CPU-second = samples/s on an otherwise idle core. The two-view terms need a second image-tower forward/backward by definition;
``views-ref`` measures exactly that cost (two views encoded, ClipLoss + 0 x the augmented
features, so the extra tower pass is also back-propagated) and each view term is also compared to it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_common import describe, finish, machine_info, median  # noqa: E402
from openclip_structure import registry  # noqa: E402
from openclip_structure.factory import create_loss  # noqa: E402

#: configuration -> plugin flags ("views-ref": two views, ClipLoss only, see the module docstring)
#: the weight each term runs at (the papers' values where they exist, as in the demo); a registry
#: term without one stops the benchmark at import (KeyError from registry.weight_flags below)
WEIGHTS = {"gap_atp": 1, "gap_cu": 1, "gc": 0.25, "gc_aug": 0.25, "bridge": 1, "sep": 1, "inmodal": 1}


def _flags(*keys: str) -> List[str]:
    return registry.weight_flags({key: WEIGHTS[key] for key in keys})


#: configuration -> plugin flags: the loss-only terms, the two-view reference (the second image-tower
#: pass alone), each view term of the registry, and every registry term together
CONFIGS: Dict[str, List[str]] = {
    "baseline": [],
    "gap (atp+cu)": _flags("gap_atp", "gap_cu"),
    "gc": _flags("gc"),
    "gap+gc": _flags("gap_atp", "gap_cu", "gc"),
    "views-ref": [],
    **{spec.key: _flags(spec.key) for spec in registry.TERMS if spec.views},
    "all": _flags(*(spec.key for spec in registry.TERMS)),
}
VIEW_CONFIGS = {"views-ref", "all"} | {spec.key for spec in registry.TERMS if spec.views}
#: the heavier "small" model (seconds per step on CPU) runs this subset by default, with more
#: repetitions instead (bridge and gc_aug are per-row / Gram-cheap: measured on structure-tiny)
SMALL_MODEL_CONFIGS = ["baseline", "gap (atp+cu)", "gc", "gap+gc", "views-ref", "sep", "inmodal", "all"]

#: a CPU-sized ViT with ViT-B-32's embedding width (D = 512), random init
SMALL_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 384, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 6},
}


def make_args(extra: List[str], model: str = "structure-tiny") -> argparse.Namespace:
    """The args open_clip_train trains with: its own parser with the plugin's group
    (``openclip_structure.main.parse_args``, which validates the flags) on ``--model model`` +
    ``extra``, then what its main sets after parsing for one process."""
    from openclip_structure.main import parse_args

    args = parse_args(["--model", model] + list(extra))
    args.rank, args.local_rank, args.world_size, args.distributed = 0, 0, 1, False
    args.distill = args.distill_model is not None and args.distill_pretrained is not None
    return args


class ViewsReference(nn.Module):
    """ClipLoss plus 0 x the augmented features: the cost of the second image-tower pass alone."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, image_features, text_features, logit_scale, output_dict=False, **kw):
        out = self.base(image_features, text_features, logit_scale, output_dict=True)
        aug = kw.get("image_aug_features")
        if aug is not None:
            out["contrastive_loss"] = out["contrastive_loss"] + 0.0 * aug.sum()
        return out if output_dict else sum(out.values())


def views_available() -> Optional[str]:
    """None when the launcher's view/heads wiring can be used, else why not."""
    try:
        from openclip_structure.integration import model as model_hook  # noqa: F401
        from openclip_structure.views import heads  # noqa: F401
        if not hasattr(model_hook, "prepare_model"):
            return "openclip_structure.integration.model has no prepare_model"
    except Exception as e:  # pragma: no cover - depends on the other work in progress
        return f"{type(e).__name__}: {e}"
    return None


#: open_clip_train's --precision values a Runner supports -> autocast dtype (None: no autocast)
PRECISIONS = {"fp32": None, "amp_bf16": torch.bfloat16, "amp": torch.float16}


class Runner:
    """One configuration's model, AdamW and fixed batch; :meth:`step` is open_clip_train's step.

    ``precision`` as open_clip_train's ``--precision``: ``amp_bf16`` = bf16 autocast, ``amp`` = fp16
    autocast with a ``torch.amp.GradScaler`` (open_clip's defaults), ``fp32`` = neither."""

    def __init__(self, name: str, model_name: str, batch: int, seed: int = 0, lr: float = 1e-4,
                 device: str = "cpu", precision: str = "fp32"):
        import open_clip

        from openclip_structure.integration.forward import install_forward
        from openclip_structure.integration.model import prepare_model

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.autocast_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "amp" else None
        self.name = name
        self.args = args = make_args(CONFIGS[name], model=model_name)
        torch.manual_seed(seed)
        model, preprocess_train, _ = open_clip.create_model_and_transforms(model_name, output_dict=True)
        self.two_views = name in VIEW_CONFIGS
        if self.two_views:
            if name == "views-ref":
                install_forward(model)
            else:
                prepare_model(args, model_name, model, preprocess_train)
        model.train()
        self.model = model.to(self.device)
        self.loss = create_loss(args)
        if name == "views-ref":
            self.loss = ViewsReference(self.loss)
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embedding" not in n)]
        self.opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}],
                                     lr=lr, betas=(0.9, 0.98), eps=1e-6)
        g = torch.Generator().manual_seed(seed + 1)
        size = model.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        shape = (batch, 2, 3, *size) if self.two_views else (batch, 3, *size)
        self.images = torch.randn(shape, generator=g).to(self.device)
        ctx = model.context_length
        vocab = model.vocab_size
        texts = torch.randint(1, vocab - 2, (batch, ctx), generator=g)
        lengths = torch.randint(3, ctx, (batch,), generator=g)
        for i, n in enumerate(lengths.tolist()):  # EOT (highest id) then padding, as the tokenizer does
            texts[i, n] = vocab - 1
            texts[i, n + 1:] = 0
        self.texts = texts.to(self.device)
        self.batch = batch

    def step(self, record: bool = False) -> Optional[Dict[str, float]]:
        with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
              else contextlib.nullcontext()):
            out = self.model(self.images, self.texts)
            losses = self.loss(**out, output_dict=True)
            total = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            total.backward()
            self.opt.step()
        else:
            self.scaler.scale(total).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return {k: float(v.detach()) for k, v in losses.items()} if record else None


def bench_model(model_name: str, batch: int, names: List[str], reps: int, steps: int, warmup: int,
                clock: str = "wall") -> Dict[str, object]:
    runners = {n: Runner(n, model_name, batch) for n in names}
    last = {}
    for n in names:
        for _ in range(warmup):
            last[n] = runners[n].step(record=True)
    times: Dict[str, List[float]] = {n: [] for n in names}
    cpu_times: Dict[str, List[float]] = {n: [] for n in names}
    pair: Dict[str, List[float]] = {n: [] for n in names}
    rng = random.Random(0)

    def measure(n):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            runners[n].step()
        dt, dc = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
        times[n].append(dt)
        cpu_times[n].append(dc)
        return dc if clock == "cpu" else dt

    others = [n for n in names if n != "baseline"]
    for _ in range(reps):
        # baseline, config, baseline, config, ... (shuffled): each configuration is compared with the
        # mean of the baseline runs right before and after it (drift and load bursts cancel)
        rng.shuffle(others)
        before = measure("baseline")
        for n in others:
            dt = measure(n)
            after = measure("baseline")
            pair[n].append(0.5 * (before + after) / dt)
            before = after
    res = {"model": model_name, "batch": batch, "reps": reps, "steps_per_rep": steps, "clock": clock, "configs": {}}
    for n in names:
        t = median(cpu_times[n] if clock == "cpu" else times[n])
        entry = {"step_ms": 1e3 * t, "samples_per_s": batch / t, "wall_step_ms": 1e3 * median(times[n]),
                 "cpu_step_ms": 1e3 * median(cpu_times[n]), "ratio": 1.0 if n == "baseline" else median(pair[n]),
                 "ratio_all": pair[n], "loss_keys": sorted(last[n]), "flags": CONFIGS[n]}
        res["configs"][n] = entry
    if "views-ref" in names:
        ref = res["configs"]["views-ref"]["ratio"]
        for n in names:
            if n in VIEW_CONFIGS:
                res["configs"][n]["ratio_vs_views_ref"] = res["configs"][n]["ratio"] / ref
    return res


def table(res: Dict[str, object]) -> str:
    per = "CPU-" if res.get("clock") == "cpu" else ""
    lines = [f"model {res['model']}, batch {res['batch']} ({res['reps']} interleaved reps x {res['steps_per_rep']} steps; "
             f"times: {'process CPU' if per else 'wall'})",
             "", f"| configuration | step ms | samples/{per}s | throughput x baseline | x views-ref |",
             "|---|---:|---:|---:|---:|"]
    for n, e in res["configs"].items():
        ref = e.get("ratio_vs_views_ref")
        lines.append(f"| {n} | {e['step_ms']:.1f} | {e['samples_per_s']:.1f} | {e.get('ratio', float('nan')):.3f} | "
                     f"{'' if ref is None else f'{ref:.3f}'} |")
    return "\n".join(lines)


def register_small_config(tmp: str) -> str:
    import open_clip

    with open(os.path.join(tmp, "bench-small.json"), "w") as f:
        json.dump(SMALL_CONFIG, f)
    open_clip.add_model_config(tmp)
    return "bench-small"


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="structure-tiny, a few steps: a smoke check")
    p.add_argument("--json", default=None, help="write results as JSON to this path ('-' = stdout, tables to stderr)")
    p.add_argument("--models", nargs="*", default=None, help="tiny and/or small (default both)")
    p.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own; 1 with --quick)")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="time behind the ratios: process CPU time (robust on a shared machine, meaningful "
                        "with 1 thread) or wall time; auto = cpu with 1 torch thread, else wall")
    args = p.parse_args(argv)
    if args.threads or args.quick:  # quick: 1 thread, robust to other load on the machine
        torch.set_num_threads(args.threads or 1)
    clock = args.clock if args.clock != "auto" else ("cpu" if torch.get_num_threads() == 1 else "wall")
    stream = sys.stderr if args.json == "-" else sys.stdout

    def log(*a):
        print(*a, file=stream, flush=True)

    from openclip_structure.configs import register_model_configs

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights" warnings: random init is intended
    register_model_configs()
    info = machine_info()
    log(describe(info) + f"; ratios from {clock} time")
    names = args.configs or list(CONFIGS)
    if "baseline" not in names:
        names = ["baseline"] + names
    pending = {}
    why = views_available()
    if why is not None:
        pending = {n: why for n in names if n in VIEW_CONFIGS}
        names = [n for n in names if n not in VIEW_CONFIGS]
        log(f"view-based configurations pending ({why}): {sorted(pending)}")
    res: Dict[str, object] = {"machine": info, "mode": "quick" if args.quick else "full", "models": [],
                              "pending": pending, "clock": clock}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            plan = [("structure-tiny", 32, args.reps or 1, args.steps or 2, 1)]
        else:
            models = args.models or ["tiny", "small"]
            plan = []
            if "tiny" in models:
                plan.append(("structure-tiny", 256, args.reps or 7, args.steps or 4, 3))
            if "small" in models:
                plan.append((register_small_config(tmp), 64, args.reps or 6, args.steps or 1, 1))
        for model_name, batch, reps, steps, warmup in plan:
            run_names = names if (args.configs or model_name == "structure-tiny") else \
                [n for n in names if n in SMALL_MODEL_CONFIGS]
            r = bench_model(model_name, batch, run_names, reps, steps, warmup, clock=clock)
            res["models"].append(r)
            log(table(r) + "\n")
    return finish(res, t0, args.json, log)


if __name__ == "__main__":
    main()
