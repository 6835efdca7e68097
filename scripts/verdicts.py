"""Verdicts on >= 10 paired seeds (issue 22, item 1): each flagged configuration against the baseline.

    python scripts/verdicts.py                     # trains what is missing (runs/verdicts), then reports
    python scripts/verdicts.py --report-only       # only the report, from runs/verdicts/sweep-<name>.json
    python scripts/verdicts.py --demo runs/scenes-bigval/results.json --pairs gap_fixed_t:baseline \\
        --results docs/results/scenes_bigval --name pairs   # paired differences between a demo's methods

Each configuration is one ``scripts/sweep.py --sweeps NAME --values W --seeds 0..9 --out runs/verdicts``
call (the 10 baseline seeds are shared and reused by name); its ``sweep.json`` is kept as
``sweep-<name>.json``. The report pairs every configuration's seed s with the baseline's seed s and
gives, per metric (zero-shot top-1, class-level R@1 image-to-text, mixed-set V-measure): the mean
paired difference, its two-sided 95 % t interval, the paired t-test p-value, Holm's adjustment of
that p over every test of the report, the sign count (seeds up / down / tied) with its exact sign-test
p, and the same interval without the seed whose baseline is weakest (a gain made by one bad baseline
run shows there). A metric
"helps" / "hurts" when its 95 % interval lies above / below 0, else it is "neutral"; a
configuration "hurts" when any metric hurts, "helps" when one helps and none hurts, else "neutral".
Writes ``verdicts.json`` (every seed's numbers and the statistics) and ``verdicts.md`` to
``--results`` (default docs/results/verdicts).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
from scipy import special

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

# (sweep name, weight): the configurations the 3-seed sweeps flagged (issue 22)
CONFIGS = [("gap", 1.0), ("separation", 0.3), ("inmodal", 0.1), ("gc_aug", 0.05)]
METRICS = [("zeroshot_top1", "zero-shot top-1"), ("i2t_class_r1", "class R@1 i2t"),
           ("mixed_v_measure", "mixed V")]
# --demo: the group task's measures (issue 22, item 2)
DEMO_METRICS = ["gap", "cos_true_pairs", "separability", "mixed_v_measure", "image_v_measure", "text_v_measure",
                "i2t_r1", "t2i_r1", "i2t_class_r1", "zeroshot_top1"]


def paired_stats(base, other, level: float = 0.95) -> dict:
    """Paired comparison of ``other[i] - base[i]``: mean, its two-sided ``level`` t interval, the
    paired t-test p-value (two-sided), the sign count and the exact two-sided sign-test p (ties
    dropped)."""
    d = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    n = d.size
    if n < 2:
        raise ValueError(f"need at least 2 pairs, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    q = float(special.stdtrit(n - 1, 0.5 + level / 2))
    if se > 0:
        t = mean / se
        p = float(2 * special.stdtr(n - 1, -abs(t)))
    else:
        t, p = (math.copysign(math.inf, mean) if mean else math.nan), (0.0 if mean else 1.0)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    m = up + down
    sign_p = min(1.0, 2 * sum(math.comb(m, k) for k in range(min(up, down) + 1)) / 2 ** m) if m else 1.0
    return {"n": n, "diff": mean, "sd": sd, "se": se, "ci": [mean - q * se, mean + q * se], "t": t, "p": p,
            "up": up, "down": down, "tied": n - m, "sign_p": sign_p}


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values, in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    adj = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (p.size - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def verdict(ci) -> str:
    return "helps" if ci[0] > 0 else ("hurts" if ci[1] < 0 else "neutral")


def overall(verdicts) -> str:
    return "hurts" if "hurts" in verdicts else ("helps" if "helps" in verdicts else "neutral")


def report(sweeps: dict, configs=CONFIGS, metrics=METRICS) -> dict:
    """``sweeps``: {sweep name: sweep.json document}. Returns the verdicts document (per-seed numbers,
    statistics per configuration and metric, Holm-adjusted p over every test)."""
    first = sweeps[configs[0][0]]
    base = {int(s): m for s, m in first["baseline"].items()}
    out = {"seeds": sorted(base), "baseline": {s: {k: base[s][k] for k, _ in metrics} for s in sorted(base)},
           "configs": {}, "metrics": [k for k, _ in metrics], "recipe": first.get("size")}
    tests = []
    for name, w in configs:
        doc = sweeps[name]
        b = {int(s): m for s, m in doc["baseline"].items()}
        runs = {int(s): m for s, m in doc["sweeps"][name]["runs"][f"{w:g}"].items()}
        seeds = sorted(set(runs) & set(b))
        label = f"{name} {w:g}"
        entry = {"flags": [f.format(w=f"{w:g}") for f in doc["sweeps"][name]["flags"]], "seeds": seeds,
                 "per_seed": {s: {k: runs[s][k] for k, _ in metrics} for s in seeds}, "stats": {}}
        for key, _ in metrics:
            # the baseline of a configuration is the one its own sweep ran (the same runs, reused by name)
            st = paired_stats([b[s][key] for s in seeds], [runs[s][key] for s in seeds])
            st["mean"] = float(np.mean([runs[s][key] for s in seeds]))
            st["baseline_mean"] = float(np.mean([b[s][key] for s in seeds]))
            st["verdict"] = verdict(st["ci"])
            # robustness: the same test without the seed whose baseline is weakest on this metric
            drop = min(seeds, key=lambda s: b[s][key])
            rest = [s for s in seeds if s != drop]
            loo = paired_stats([b[s][key] for s in rest], [runs[s][key] for s in rest])
            st["without_weakest_baseline_seed"] = {"dropped": drop, "diff": loo["diff"], "ci": loo["ci"],
                                                   "p": loo["p"], "verdict": verdict(loo["ci"])}
            entry["stats"][key] = st
            tests.append((label, key))
        out["configs"][label] = entry
    adjusted = holm([out["configs"][c]["stats"][k]["p"] for c, k in tests])
    for (c, k), p in zip(tests, adjusted):
        out["configs"][c]["stats"][k]["p_holm"] = p
    for entry in out["configs"].values():
        entry["verdict"] = overall([entry["stats"][k]["verdict"] for k, _ in metrics])
    return out


def markdown(doc: dict, metrics=METRICS) -> str:
    seeds = doc["seeds"]
    lines = [f"Paired by seed, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}). Each cell: mean paired difference "
             "to the baseline [95 % t interval], paired t-test p (Holm-adjusted over all "
             f"{len(doc['configs']) * len(metrics)} tests), seeds up/down; verdict: helps / hurts when the "
             "interval excludes 0.", "",
             "| configuration | " + " | ".join(label for _, label in metrics) + " | verdict |",
             "|---|" + "---|" * (len(metrics) + 1)]
    base = doc["baseline"]
    lines.append("| baseline (mean ± std) | " + " | ".join(
        f"{np.mean([base[s][k] for s in seeds]):.3f} ± {np.std([base[s][k] for s in seeds], ddof=1):.3f}"
        for k, _ in metrics) + " | - |")
    for label, entry in doc["configs"].items():
        cells = []
        for k, _ in metrics:
            st = entry["stats"][k]
            cells.append(f"{st['mean']:.3f}: {st['diff']:+.3f} [{st['ci'][0]:+.3f}, {st['ci'][1]:+.3f}], "
                         f"p {st['p']:.3g} (Holm {st['p_holm']:.2g}), {st['up']}/{st['down']} up/down "
                         f"(sign p {st['sign_p']:.2g}), **{st['verdict']}**")
        lines.append(f"| {label} (`{' '.join(entry['flags'])}`) | " + " | ".join(cells) + f" | **{entry['verdict']}** |")
    lines += ["", "Without the seed whose baseline is weakest on the metric (mean paired difference [95 % t "
              "interval], verdict):", "", "| configuration | " + " | ".join(label for _, label in metrics) + " |",
              "|---|" + "---|" * len(metrics)]
    for label, entry in doc["configs"].items():
        cells = []
        for k, _ in metrics:
            lo = entry["stats"][k]["without_weakest_baseline_seed"]
            cells.append(f"{lo['diff']:+.3f} [{lo['ci'][0]:+.3f}, {lo['ci'][1]:+.3f}] (seed {lo['dropped']} out), "
                         f"{lo['verdict']}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (" + ", ".join(label for _, label in metrics) + "):", "",
              "| seed | baseline | " + " | ".join(doc["configs"]) + " |", "|---|---|" + "---|" * len(doc["configs"])]
    for s in seeds:
        row = [" / ".join(f"{base[s][k]:.3f}" for k, _ in metrics)]
        for entry in doc["configs"].values():
            m = entry["per_seed"].get(s)
            row.append(" / ".join(f"{m[k]:.3f}" for k, _ in metrics) if m else "-")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def demo_pairs(doc: dict, pairs, metrics) -> dict:
    """Paired statistics between methods of one ``scripts/demo.py`` results.json: for each
    ``(method, reference)`` in ``pairs`` and each metric key, :func:`paired_stats` over their common
    seeds (``doc["seeds"][m]`` lists the seed of each of ``doc["runs"][m]``)."""
    by_seed = {m: dict(zip(doc["seeds"][m], doc["runs"][m])) for m in doc["runs"]}
    out = {}
    for method, ref in pairs:
        seeds = sorted(set(by_seed[method]) & set(by_seed[ref]))
        cell = {}
        for key in metrics:
            if all(key in by_seed[x][s] for x in (method, ref) for s in seeds):
                st = paired_stats([by_seed[ref][s][key] for s in seeds], [by_seed[method][s][key] for s in seeds])
                cell[key] = {**st, "verdict": "up" if st["ci"][0] > 0 else ("down" if st["ci"][1] < 0 else "neutral")}
        out[f"{method} vs {ref}"] = {"seeds": seeds, "stats": cell}
    return out


def demo_pairs_markdown(pairs: dict, metrics) -> str:
    lines = ["| comparison (paired by seed) | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, entry in pairs.items():
        cells = []
        for key in metrics:
            st = entry["stats"].get(key)
            cells.append("-" if st is None else f"{st['diff']:+.3f} [{st['ci'][0]:+.3f}, {st['ci'][1]:+.3f}] "
                         f"{st['up']}/{st['down']} ({st['verdict']})")
        lines.append(f"| {label} ({len(entry['seeds'])} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "verdicts"), help="the sweeps' run folder")
    p.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "verdicts"))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="read the sweep-<name>.json files, train nothing")
    p.add_argument("--demo", default=None, metavar="RESULTS_JSON",
                   help="instead: paired differences between the methods of a demo.py results.json (--pairs)")
    p.add_argument("--pairs", nargs="+", default=[], metavar="METHOD:REFERENCE")
    p.add_argument("--metrics", nargs="+", default=None, help="--demo: metric keys (default: the table's)")
    p.add_argument("--name", default="pairs", help="--demo: output files <name>.json / <name>.md in --results")
    args = p.parse_args(argv)
    cmd = "python scripts/verdicts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.demo:
        metrics = args.metrics or DEMO_METRICS
        doc = json.load(open(args.demo))
        pairs = demo_pairs(doc, [tuple(x.split(":", 1)) for x in args.pairs], metrics)
        md = demo_pairs_markdown(pairs, metrics) + f"\nMean difference [95 % t interval] seeds up/down (verdict). " \
            f"Produced by `{cmd.strip()}`.\n"
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, f"{args.name}.json"), "w") as f:
            json.dump({"source": args.demo, "source_command": doc.get("command"), "pairs": pairs,
                       "command": cmd.strip()}, f, indent=1)
        with open(os.path.join(args.results, f"{args.name}.md"), "w") as f:
            f.write(md)
        print(md)
        return 0
    if not args.report_only:
        import sweep
        for name, w in CONFIGS:
            sweep.main(["--sweeps", name, "--values", f"{w:g}", "--seeds", *map(str, args.seeds),
                        "--out", args.out, "--jobs", str(args.jobs)])
            for ext in ("json", "md"):
                shutil.copy(os.path.join(args.out, f"sweep.{ext}"), os.path.join(args.out, f"sweep-{name}.{ext}"))
    sweeps = {name: json.load(open(os.path.join(args.out, f"sweep-{name}.json"))) for name, _ in CONFIGS}
    doc = report(sweeps)
    doc["command"] = cmd.strip()
    doc["sweep_commands"] = {name: sweeps[name].get("command") for name, _ in CONFIGS}
    md = markdown(doc) + f"\nProduced by `{cmd.strip()}`.\n"
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "verdicts.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.results, "verdicts.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
