"""Weight sweeps (issue 14, item 3): each method at >= 3 weights spanning >= 10x, >= 3 seeds, on
the demo's recipe and data, compared with the baseline paired by seed.

    python scripts/sweep.py                        # every sweep below, seeds 0 1 2
    python scripts/sweep.py --sweeps gc bridge --seeds 0 1 2 3 4
    python scripts/sweep.py --task scenes --out runs/sweep-scenes

Writes (in --out): one run folder per method/weight/seed, ``sweep.json`` (every run's metrics and
the paired differences), ``sweep.md`` (the table) and ``sweep_<sweep>.png`` per sweep (each metric
vs weight, one point per seed, the baseline's mean ± std as a band). Runs already in --out are
reused, so an interrupted sweep continues where it stopped.

Reading rule (printed in the table): the difference to the baseline is taken per seed; a weight
moves a metric "up"/"down" when the mean paired difference is beyond t(0.975, n-1) standard
errors (two-sided 95 %, n seeds), otherwise it is "neutral". `--values` replaces the swept values
of a single sweep (e.g. `--sweeps gap --values 1 3`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)

import demo  # noqa: E402
from openclip_structure.registry import weight_flags  # noqa: E402


def weights(*keys, w="{w}"):
    """The weight flags of the registry terms ``keys``, each at ``w``."""
    return weight_flags(dict.fromkeys(keys, w))


# sweep name -> (flags with {w} for the swept value, values, what is swept)
SWEEPS = {
    "gap": (weights("gap_atp", "gap_cu"), [0.1, 1, 3], "ATP = CU weight"),
    "gc": (weights("gc"), [0.05, 0.25, 1], "weight"),
    "gc_aug": (weights("gc_aug"), [0.05, 0.25, 1], "weight"),
    "bridge": (weights("bridge"), [0.01, 0.1, 1], "weight"),
    # t = 0.25 (the default) at weight 0.1 is the bridge sweep's 0.1 run
    "bridge_t": (weights("bridge", w="0.1") + ["--bridge-t", "{w}"], [0.1, 0.5, 0.9], "t (weight 0.1)"),
    "separation": (weights("sep"), [0.1, 0.3, 1], "weight"),
    "inmodal": (weights("inmodal") + ["--text-aug", "eda"], [0.1, 0.3, 1], "weight (EDA text view)"),
}
# (metrics key, label, higher is better?) shown per sweep; the headline first
METRICS = [("zeroshot_top1", "zero-shot top-1", True), ("mixed_v_measure", "mixed-set V-measure", True),
           ("i2t_class_r1", "class-level R@1 i2t", True), ("gap", "modality gap", None)]
# the structural diagnostic each method should move (openclip_structure.evaluation.diagnostics)
DIAGNOSTIC = {"gap": "gap", "gc": "gc_cross_asym", "gc_aug": "aug_view_distance", "bridge": "bridge_distance",
              "bridge_t": "bridge_distance", "separation": "sep_image_shared_ind_abs_corr",
              "inmodal": "aug_view_distance"}
# two-sided 95 % t quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _fmt(w) -> str:
    return f"{w:g}"


def run_name(name, flags, value) -> str:
    """The run folder's method name: the demo's own name where the flags are the demo's (the papers'
    weights), so `demo.py --out` on the same folder reuses those runs; else ``<sweep>-w<value>``."""
    return name if demo.METHODS.get(name) == flags else f"{name}-w{_fmt(value)}"


def sweep_flags(flags, value) -> list:
    return [f.format(w=_fmt(value)) for f in flags]


def paired(base: dict, runs: dict, key: str):
    """(mean diff, standard error, n, verdict) of runs[seed][key] - base[seed][key] over common seeds."""
    seeds = sorted(s for s in runs if s in base and key in runs[s] and key in base[s])
    d = np.array([runs[s][key] - base[s][key] for s in seeds], dtype=float)
    if d.size < 2:
        return float(d.mean()) if d.size else float("nan"), float("nan"), int(d.size), "n<2"
    se = float(d.std(ddof=1) / np.sqrt(d.size))
    t = T975.get(d.size - 1, 1.96)
    mean = float(d.mean())
    verdict = "neutral" if abs(mean) <= t * se else ("up" if mean > 0 else "down")
    return mean, se, int(d.size), verdict


def plot(name, values, base, per_value, out_dir, what):
    from openclip_structure.evaluation.plots import _figure, _save

    keys = METRICS + [(DIAGNOSTIC[name], f"diagnostic: {DIAGNOSTIC[name]}", None)]
    fig, axes = _figure(len(keys), width=4.2, height=3.4, max_cols=5)
    for ax, (key, label, _) in zip(axes, keys):
        b = np.array([m[key] for m in base.values() if key in m], dtype=float)
        if b.size:
            ax.axhspan(b.mean() - b.std(), b.mean() + b.std(), color="0.85", label="baseline mean ± std")
            ax.axhline(b.mean(), color="0.5", lw=1)
        means = []
        for w in values:
            ys = [m[key] for m in per_value[w].values() if key in m]
            ax.scatter([w] * len(ys), ys, s=14, color="#1f77b4", alpha=0.7)
            means.append(np.mean(ys) if ys else np.nan)
        ax.plot(values, means, "-o", color="#d62728", ms=4, label="mean over seeds")
        ax.set_xscale("log")
        ax.set_xlabel(what)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name}: metrics vs {what}", fontsize=10)
    return _save(fig, os.path.join(out_dir, f"sweep_{name}.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweeps", nargs="+", choices=sorted(SWEEPS), default=list(SWEEPS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--values", type=float, nargs="+", default=None,
                   help="the swept values, instead of the sweep's own (with a single --sweeps)")
    p.add_argument("--task", choices=sorted(demo.TASKS), default="digits")
    p.add_argument("--out", default=None, help="default runs/sweep (runs/sweep-<model> for another --model)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=None)
    for key, typ in demo.OVERRIDES:
        p.add_argument(f"--{key}", type=typ, default=None, help=f"override the recipe's {key}")
    args = p.parse_args(argv)
    if len(args.seeds) < 2:
        raise SystemExit("--seeds: at least 2 seeds (the differences are paired by seed)")
    if args.values and len(args.sweeps) != 1:
        raise SystemExit("--values needs exactly one sweep in --sweeps")
    sweeps = {n: (SWEEPS[n][0], args.values or SWEEPS[n][1], SWEEPS[n][2]) for n in args.sweeps}
    size = dict(demo.SIZES["cuda" if args.device == "cuda" else "default"])
    if args.device == "cpu":
        size.update(demo.TASK_SIZES.get(args.task, {}))
    size.update({key: getattr(args, key) for key, _ in demo.OVERRIDES if getattr(args, key) is not None})
    out_dir = os.path.abspath(args.out or demo.default_out("sweep", size["model"],
                                                           "cuda" if args.device == "cuda" else "default"))
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    data = demo.make_data(os.path.join(out_dir, "data"), args.task)
    runs = [("baseline", [], s) for s in args.seeds]
    for name in args.sweeps:
        flags, values, _ = sweeps[name]
        for w in values:
            runs += [(run_name(name, sweep_flags(flags, w), w), sweep_flags(flags, w), s) for s in args.seeds]
    jobs = args.jobs or demo.default_jobs(args.device, args.threads)
    print(f"[sweep] {len(runs)} runs, {jobs} at a time", flush=True)
    metrics = {}
    for (method, _, seed), (_, m) in zip(runs, demo.run_all(runs, data, size, out_dir, args.device, jobs,
                                                           args.threads)):
        metrics.setdefault(method, {})[seed] = m
    base = metrics["baseline"]

    lines = ["| sweep | value | " + " | ".join(f"{label}: mean (paired diff ± se)" for _, label, _ in METRICS)
             + " | diagnostic (paired diff ± se) |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    report, pngs = {}, []
    for name in args.sweeps:
        flags, values, what = sweeps[name]
        per_value = {w: metrics[run_name(name, sweep_flags(flags, w), w)] for w in values}
        report[name] = {"flags": flags, "values": values, "runs": {_fmt(w): per_value[w] for w in values},
                        "paired": {}}
        for w in values:
            cells = []
            for key, _, _ in METRICS + [(DIAGNOSTIC[name], "", None)]:
                mean_d, se, n, verdict = paired(base, per_value[w], key)
                vals = [m[key] for m in per_value[w].values() if key in m]
                mean = float(np.mean(vals)) if vals else None
                report[name]["paired"].setdefault(_fmt(w), {})[key] = dict(mean=mean, diff=mean_d,
                                                                            se=se, n=n, verdict=verdict)
                cells.append(f"{mean if mean is not None else float('nan'):.3f} ({mean_d:+.3f} ± {se:.3f}, {verdict})")
            lines.append(f"| {name} | {_fmt(w)} | " + " | ".join(cells) + " |")
        pngs.append(plot(name, values, base, per_value, out_dir, what))
    base_cells = []
    for key, _, _ in METRICS:
        b = np.array([m[key] for m in base.values()], dtype=float)
        base_cells.append(f"{b.mean():.3f} ± {b.std(ddof=1):.3f}")
    lines.insert(2, "| baseline | - | " + " | ".join(base_cells) + " | - |")
    cmd = "python scripts/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"Weight sweeps on the {args.task} task, seeds {args.seeds}, recipe: {size['epochs']} epochs, batch "
          f"{size['batch']}, lr {size['lr']:g}, model {size['model']}. Each cell: mean over seeds (mean paired "
          f"difference to the baseline ± its standard error, verdict: up/down when beyond the two-sided 95 % "
          f"t quantile, else neutral).\n\n" + "\n".join(lines)
          + f"\n\nProduced by `{cmd.strip()}` in {time.time() - start:.0f}s.\n")
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump({"size": size, "seeds": args.seeds, "task": args.task, "baseline": base, "sweeps": report,
                   "plots": pngs, "command": cmd.strip()}, f, indent=1)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
