"""The output of the loss-only benchmark (``bench_losses.py``): the table of one configuration, the
summary of the ratios over all configurations, and the ``--scaling`` plot (docs/scaling.png).
"""
from __future__ import annotations

from typing import Dict, List


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
