"""The main job: train a small CLIP from scratch on real bundled images once per method, then
measure the modality gap and group-level structure of every checkpoint and print one table.

    python scripts/demo.py            # default: baseline x 5 seeds, every other method x 3 seeds (docs/recipe.md)

Methods: the baseline, each term of the registry (``openclip_structure.registry.TERMS``) at the
papers' weight (the two gap terms together as ``gap``) and ``all`` = those terms together; a
registry term left out of the demo is in :data:`LEFT_OUT`, with the reason printed when ``all`` runs.
    python scripts/demo.py --quick    # 1 seed, a short budget: a ~2-3 minute end-to-end check
    python scripts/demo.py --device cuda   # the same experiment, scaled up, on a GPU

Data: scikit-learn's 1,797 handwritten digits (8x8, upscaled to 32x32) with captions from varied
templates, written as webdataset shards (train/val, ``<key>.cls`` labels). Training goes through
``python -m openclip_structure.main`` (open_clip's own training loop) with identical seeds and
budget for every method. Outputs (in --out): shards, one run folder per method and seed,
``results.json``, ``results.md`` (the table) and PNG plots.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from openclip_structure import registry  # noqa: E402

# the demo's weight of each registry term (the papers' published values where they exist)
WEIGHTS = {"gap_atp": 1, "gap_cu": 1, "gc": 0.25, "gc_aug": 0.25, "bridge": 1, "sep": 1}
# registry terms that no method trains, "all" included, and why (printed when "all" runs)
LEFT_OUT = {
    "inmodal": "CyCLIP's in-modal objective needs a text view (--text-aug eda), which in 'all' would also change "
               "the text halves of gc_aug and separation; without one only its image half trains. The demo has no "
               "text view, and the README's 'all of them' rows were trained without inmodal; its weight sweep runs "
               "it with the text view (scripts/sweep.py --sweeps inmodal)",
}
# method name -> the registry terms it trains, each at its WEIGHTS value
METHOD_TERMS = {"gap": ("gap_atp", "gap_cu"), "gc": ("gc",), "gc_aug": ("gc_aug",), "bridge": ("bridge",),
                "separation": ("sep",)}


def _check_terms():
    """Every registry term has a demo weight or a reason to be left out (a new term must choose)."""
    keys = [spec.key for spec in registry.TERMS]
    undecided = [k for k in keys if (k in WEIGHTS) == (k in LEFT_OUT)]
    unknown = sorted((set(WEIGHTS) | set(LEFT_OUT) | {k for t in METHOD_TERMS.values() for k in t}) - set(keys))
    if undecided or unknown:
        raise SystemExit(f"[demo] registry terms {undecided} need a demo weight (WEIGHTS) or a reason to be "
                         f"left out (LEFT_OUT), exactly one; unknown terms {unknown}")


_check_terms()


def term_flags(keys):
    """Plugin flags that train the registry terms ``keys`` at the demo's weights, in registry order."""
    return registry.weight_flags({key: WEIGHTS[key] for key in keys})


# method name -> plugin flags
METHODS = {"baseline": [], **{method: term_flags(keys) for method, keys in METHOD_TERMS.items()}}
# methods run only when named in --methods (not in the default demo, not in "all"): Grassucci et al.'s
# own comparison trains their loss at a FIXED temperature 0.1 against learned-temperature CLIP; the
# fixed-temperature baseline is the control that separates the temperature's effect from the loss's
FIXED_T = ["--fixed-temperature", "0.1"]
EXTRA_METHODS = {
    "baseline_fixed_t": FIXED_T,
    "gap_fixed_t": METHODS["gap"] + FIXED_T,
    # the learned temperature started at open_clip's clamp (logit scale 100, T 0.01) instead of 1/0.07: the
    # same architecture and initial weights (structure-tiny-avg-ls100 differs in init_logit_scale only), so
    # its checkpoint loads into the default model for evaluation; only with the default --model
    "baseline_ls100": ["--model", "structure-tiny-avg-ls100"],
}
# the columns of the printed table: (metrics key, header)
COLUMNS = [
    ("zeroshot_top1", "zero-shot"), ("i2t_class_r1", "class R@1 i2t"), ("gap", "gap"), ("gap_floor", "gap floor"), ("cos_true_pairs", "cos pairs"), ("separability", "separab."),
    ("i2t_r1", "R@1 i2t"), ("t2i_r1", "R@1 t2i"), ("i2t_caption_r1", "caption R@1 i2t"),
    ("t2i_caption_r1", "caption R@1 t2i"), ("mixed_v_measure", "mixed V"),
    ("mixed_nmi", "mixed NMI"), ("mixed_ari", "mixed ARI"), ("image_v_measure", "image V"),
    ("text_v_measure", "text V"),
]
# per-term structural diagnostics (openclip_structure.evaluation.diagnostics): a second table
DIAG_COLUMNS = [
    ("gc_cross_asym", "gc vt-tv asym"), ("gc_inmodal_diff", "gc vv-tt diff"), ("bridge_distance", "bridge dist"),
    ("aug_view_distance", "aug-view dist"), ("sep_image_shared_ind_cos2", "sep img cos²"),
    ("sep_image_shared_ind_abs_corr", "sep img abs corr"), ("sep_image_ind_probe_accuracy", "sep img ind probe"),
    ("sep_text_ind_probe_accuracy", "sep txt ind probe"),
]
SIZES = {
    #           epochs, batch, train samples, seeds (method_seeds: seeds of the non-baseline methods)
    # docs/recipe.md: average-pooled image tower + batch 32 leaves the log(batch) plateau by epoch 3-4;
    # 14 epochs give baseline zero-shot 0.922-0.964 over seeds 0-4 (10 epochs: one seed at 0.804)
    "default": dict(epochs=14, batch=32, samples=1344, seeds=5, method_seeds=3, lr=2e-3, warmup=40,
                    model="structure-tiny-avg"),
    "quick": dict(epochs=1, batch=64, samples=640, seeds=1, lr=2e-3, warmup=20, model="structure-tiny"),
    "cuda": dict(epochs=40, batch=128, samples=1280, seeds=3, lr=2e-3, warmup=20, model="structure-tiny"),
}
# per-task changes to the default size: on the scenes the digit is learned only after ~8 epochs on
# the colour/background plateau (docs/results/scenes), so they get more epochs
TASK_SIZES = {"scenes": dict(epochs=30), "scenes-bigval": dict(epochs=30)}
# command-line overrides of a size (the recipe sweep in docs/recipe.md uses them)
OVERRIDES = (("epochs", int), ("batch", int), ("samples", int), ("lr", float), ("warmup", int), ("model", str))


def available_methods():
    """Every method of METHODS plus 'all': every registry term together, but those of LEFT_OUT."""
    return {**METHODS, "all": term_flags([spec.key for spec in registry.TERMS if spec.key not in LEFT_OUT])}


def all_description():
    """What 'all' trains, and which registry terms it leaves out and why."""
    text = "'all' = " + ", ".join(spec.key for spec in registry.TERMS if spec.key not in LEFT_OUT) + " together"
    return text + "".join(f"; it leaves out {k}: {why}" for k, why in LEFT_OUT.items())


# the bundled tasks: name -> (writer module, function); "scenes" is the group task with nuisance
# variation (openclip_structure/data/scenes.py)
TASKS = {"digits": ("openclip_structure.data.writer", "write_digits_dataset"),
         "scenes": ("openclip_structure.data.scenes", "write_scenes_dataset"),
         # the same training shards as "scenes", 40x the validation pairs (the gap's noise floor / 6.3)
         "scenes-bigval": ("openclip_structure.data.scenes", "write_scenes_bigval_dataset")}


def default_out(name, model, budget="default"):
    """runs/<name>, with the model's name appended when it is not the budget's own: runs are reused by
    name, so another model (e.g. --model structure-tiny-rn) must not find the ViT's runs."""
    base = os.path.join(ROOT, "runs", name)
    return base if model == SIZES[budget]["model"] else f"{base}-{model}"


def make_data(out_dir, task="digits"):
    import importlib

    info_path = os.path.join(out_dir, "dataset.json")
    if os.path.exists(info_path):
        info = json.load(open(info_path))
        if info.get("task", "digits") != task:
            raise SystemExit(f"[demo] {out_dir} holds the {info.get('task', 'digits')!r} task's data, not "
                             f"{task!r}: use another --out (its runs would be reused)")
        if "prompts" in info:  # older demo folders lack the zero-shot class names and templates
            return info
    print(f"[demo] writing {task} shards to {out_dir}", flush=True)
    module, name = TASKS[task]
    info = getattr(importlib.import_module(module), name)(out_dir, image_size=32, seed=0, val_fraction=0.25,
                                                           train_shards=8, val_shards=2)
    info["task"] = task
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return info


def train(method, flags, seed, data, size, out_dir, device, threads=None):
    name = f"{method}-seed{seed}"
    ckpt = os.path.join(out_dir, name, "checkpoints", f"epoch_{size['epochs']}.pt")
    if os.path.exists(ckpt):
        print(f"[demo] {name}: reusing {ckpt}", flush=True)
        return ckpt
    if os.path.exists(os.path.join(out_dir, name)):  # an interrupted run: start it again
        import shutil
        shutil.rmtree(os.path.join(out_dir, name))
    argv = [sys.executable, "-m", "openclip_structure.main", "--",
            "--train-data", data["train"]["pattern"], "--dataset-type", "webdataset",
            "--train-num-samples", str(size["samples"]), "--model", size["model"],
            "--batch-size", str(size["batch"]), "--epochs", str(size["epochs"]), "--lr", str(size["lr"]),
            "--warmup", str(size["warmup"]), "--wd", "0.1", "--workers", "1", "--seed", str(seed),
            "--logs", out_dir, "--name", name, "--log-every-n-steps", "5", "--report-to", "tensorboard",
            "--save-frequency", "0",  # only the last epoch's checkpoint (39 MB each with the optimizer state)
            "--precision", "amp" if device == "cuda" else "fp32"] + flags
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    print(f"[demo] training {name} ({size['epochs']} epochs) {' '.join(flags)}", flush=True)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(ckpt):
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"[demo] training {name} failed (exit {proc.returncode}); log above")
    print(f"[demo]   done in {time.time() - start:.0f}s", flush=True)
    return ckpt


def evaluate(ckpt, data, device, model="structure-tiny"):
    from openclip_structure.evaluation.evaluator import evaluate_checkpoint

    res = evaluate_checkpoint(model, ckpt, data["val"]["pattern"], device=device, seed=0,
                              diagnostics=True)
    return res["metrics"]


def _run_one(method, flags, seed, data, size, out_dir, device, threads):
    """Train one method/seed and evaluate its checkpoint (in a worker process of run_all)."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    ckpt = train(method, flags, seed, data, size, out_dir, device, threads)
    return ckpt, evaluate(ckpt, data, device, size["model"])


def default_jobs(device, threads):
    """Parallel runs on CPU: one per `threads` cores (at most 8); 1 on a GPU."""
    if device != "cpu":
        return 1
    return max(1, min(8, (os.cpu_count() or 1) // max(1, threads)))


def run_all(runs, data, size, out_dir, device, jobs=1, threads=1):
    """runs: [(method, flags, seed)] -> [(ckpt, metrics)] in the same order.

    Every run trains and evaluates with `threads` intra-op threads whatever `jobs` is, so a run's
    numbers do not depend on the machine's core count or on how many runs share it (CPU float
    reductions depend on the thread count).
    """
    total = len(runs)
    if jobs <= 1:
        out = []
        for i, (method, flags, seed) in enumerate(runs, 1):
            print(f"[demo] run {i}/{total}", flush=True)
            out.append(_run_one(method, flags, seed, data, size, out_dir, device, threads))
        return out
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_run_one, m, f, s, data, size, out_dir, device, threads) for m, f, s in runs]
        done = 0
        for fut in concurrent.futures.as_completed(futures):
            fut.result()  # a failed run stops the demo here, with its log
            done += 1
            print(f"[demo] run {done}/{total} finished", flush=True)
        return [fut.result() for fut in futures]


def summarise(per_method):
    """{method: {metric: (mean, std, n)}} over seeds."""
    out = {}
    for method, runs in per_method.items():
        out[method] = {}
        for key, _ in COLUMNS + DIAG_COLUMNS:
            vals = np.array([r[key] for r in runs if key in r], dtype=float)
            if vals.size:
                out[method][key] = (float(vals.mean()), float(vals.std(ddof=1)) if vals.size > 1 else 0.0,
                                    int(vals.size))
    return out


def table(summary, seeds, columns=None):
    columns = COLUMNS if columns is None else columns
    head = ["method"] + [h for _, h in columns]
    rows = []
    for method, stats in summary.items():
        cells = [method]
        for key, _ in columns:
            if key not in stats:
                cells.append("-")
                continue
            mean, std, n = stats[key]
            cells.append(f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    note = f"mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))})" if len(seeds) > 1 else f"seed {seeds[0]}"
    return "\n".join([line(head), sep] + [line(r) for r in rows]), note


def plots(ckpts, data, out_dir, device, model_name="structure-tiny"):
    from openclip_structure.evaluation import plots as P
    from openclip_structure.evaluation.evaluator import encode_shards, load_model

    written = []
    for method in ("baseline", "gap"):
        if method not in ckpts:
            continue
        model, preprocess, tok = load_model(model_name, ckpts[method], device)
        img, txt, labels = encode_shards(model, preprocess, tok, data["val"]["pattern"])
        path = os.path.join(out_dir, f"embeddings_{method}.png")
        P.plot_embeddings(img, txt, labels, path, title=f"{method}: val embeddings (PCA)")
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch on 640 samples: a short check")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (then every method runs all)")
    p.add_argument("--method-seeds", type=int, default=None,
                   help="run the methods other than the baseline on the first N seeds only")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"subset of methods to run (default: {', '.join(available_methods())}; "
                        f"{all_description().replace('%', '%%')}); also baseline_fixed_t and gap_fixed_t "
                        "(--fixed-temperature 0.1, Grassucci et al.'s comparison), which run only when named")
    p.add_argument("--task", choices=sorted(TASKS), default="digits",
                   help="digits: captions name the class; scenes: digits in an ink colour on a background, both "
                        "named in the captions (the group task with headroom); scenes-bigval: the same training "
                        "data, 18,000 validation pairs (the gap's noise floor ~0.01)")
    p.add_argument("--out", default=None, help="output folder (default runs/demo, runs/scenes for --task scenes)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of each run (default 1: the numbers do not depend on the machine)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel (default: cores // threads, at most 8, on CPU; 1 on a GPU)")
    for key, typ in OVERRIDES:
        p.add_argument(f"--{key}", type=typ, default=None, help=f"override the budget's {key}")
    args = p.parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    size = dict(SIZES["quick" if args.quick else ("cuda" if args.device == "cuda" else "default")])  # the budget
    if not args.quick and args.device == "cpu":
        size.update(TASK_SIZES.get(args.task, {}))
    for key, typ in OVERRIDES:
        if getattr(args, key) is not None:
            if typ is not str and getattr(args, key) <= 0:
                raise SystemExit(f"--{key} must be positive, got {getattr(args, key)}")
            size[key] = getattr(args, key)
    for key in ("threads", "jobs"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be at least 1, got {getattr(args, key)}")
    budget = "quick" if args.quick else ("cuda" if args.device == "cuda" else "default")
    out = args.out or default_out("demo" if args.task == "digits" else args.task, size["model"], budget)
    out_dir = os.path.abspath(out + ("-quick" if args.quick else ""))
    os.makedirs(out_dir, exist_ok=True)
    seeds = args.seeds or list(range(size["seeds"]))
    n_other = args.method_seeds or (None if args.seeds else size.get("method_seeds"))
    methods = available_methods()
    if args.methods:
        known = {**methods, **EXTRA_METHODS}
        unknown = sorted(set(args.methods) - set(known))
        if unknown:
            raise SystemExit(f"unknown or unavailable methods {unknown}; available: {sorted(known)}")
        methods = {m: known[m] for m in args.methods}
        if "baseline_ls100" in methods and size["model"] != "structure-tiny-avg":
            raise SystemExit("baseline_ls100 is structure-tiny-avg with init_logit_scale ln 100: only with that --model")

    start = time.time()
    data = make_data(os.path.join(out_dir, "data"), args.task)
    results, first_ckpt = {}, {}
    # the baseline gets every seed; the other methods the first n_other (when set): the budget
    plan = {m: seeds if m == "baseline" or not n_other else seeds[:n_other] for m in methods}
    runs = [(m, methods[m], seed) for m in methods for seed in plan[m]]
    jobs = args.jobs or default_jobs(args.device, args.threads)
    print(f"[demo] {len(runs)} runs, {jobs} at a time, {args.threads} thread(s) each", flush=True)
    if "all" in methods:
        print(f"[demo] {all_description()}", flush=True)
    for (method, _, _), (ckpt, metrics) in zip(runs, run_all(runs, data, size, out_dir, args.device,
                                                             jobs, args.threads)):
        results.setdefault(method, []).append(metrics)
        first_ckpt.setdefault(method, ckpt)
    summary = summarise(results)
    text, note = table(summary, seeds)
    if any(len(v) != len(seeds) for v in plan.values()):
        others = sorted({len(v) for m, v in plan.items() if m != "baseline"})
        note += f" for the baseline, the first {'/'.join(map(str, others))} of them for the other methods"
    diag, _ = table(summary, seeds, DIAG_COLUMNS)
    per_seed = "\n".join(f"- {m}: " + ", ".join(f"seed {s} {r['zeroshot_top1']:.3f}" for s, r in zip(plan[m], results[m]))
                         for m in results if all("zeroshot_top1" in r for r in results[m]))
    pngs = plots(first_ckpt, data, out_dir, args.device, size["model"])
    cmd = "python scripts/demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"Validation set: {data['val']['num_samples']} {args.task} image/caption pairs, 10 classes; "
          f"{size['epochs']} epochs on {size['samples']} training pairs, batch {size['batch']}, "
          f"lr {size['lr']:g}, warmup {size['warmup']} steps, "
          f"model {size['model']}; {note}."
          + (f" {all_description()}." if "all" in methods else "")
          + f"\n\n{text}\n\nZero-shot top-1 per seed:\n\n{per_seed}\n\nPer-term structural diagnostics "
          f"(openclip_structure.evaluation.diagnostics; sep_* only where the model has separation heads):\n\n{diag}\n\n"
          f"Produced by `{cmd.strip()}` "
          f"in {time.time() - start:.0f}s.\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"size": size, "seeds": plan, "methods": methods, "runs": results,
                   "summary": summary, "plots": pngs, "command": cmd.strip()}, f, indent=1)
    print("\n" + md)
    print(f"[demo] wrote {out_dir}/results.md, results.json and {', '.join(os.path.basename(x) for x in pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
