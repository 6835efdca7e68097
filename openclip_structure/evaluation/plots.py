"""Figures for the modality gap: embedding maps, the shift diagnostic and the gap over training.

matplotlib is optional for the package: it is imported inside the functions, and only its
object-oriented API with the Agg canvas is used (``matplotlib.figure.Figure``), so no global
backend is switched and no display is needed. UMAP (``umap-learn``) is used only when asked for
and importable; otherwise the 2-D maps are PCA.

- :func:`plot_embeddings`        image + text embeddings in 2-D, coloured by modality and by class.
- :func:`plot_shift_curve`       metrics vs the shift alpha of ``evaluate --shift`` (Liang et al. 2022).
- :func:`plot_gap_over_training` gap-like keys of open_clip's ``checkpoints/results.jsonl`` vs epoch.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["project_2d", "plot_embeddings", "plot_shift_curve", "plot_gap_over_training", "read_results_jsonl"]

MODALITY_COLORS = {"image": "#1f77b4", "text": "#ff7f0e"}


def _figure(npanels: int, width: float = 5.5, height: float = 4.5, max_cols: int = 3):
    """A matplotlib Figure (no pyplot, Agg canvas) with ``npanels`` axes, at most ``max_cols`` a row."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install matplotlib "
                          "(or the package's 'plots' extra)") from e
    ncols = min(npanels, max_cols)
    nrows = math.ceil(npanels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[npanels:]:
        ax.set_visible(False)
    return fig, axes[:npanels]


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)  # Figure without pyplot: rendered by the Agg canvas
    return str(path)


def _unit_rows(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array, got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``x`` and the name of the method actually used.

    ``method="umap"`` uses ``umap.UMAP(random_state=seed)`` when umap-learn is importable and
    falls back to PCA (with a warning) otherwise. PCA is an SVD of the centred rows.
    """
    method = method.lower()
    if method not in ("pca", "umap"):
        raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")
    if method == "umap":
        try:
            import umap  # type: ignore
        except ImportError:
            warnings.warn("umap-learn is not installed; using PCA for the embedding plot", stacklevel=2)
        else:
            n_neighbors = max(2, min(15, x.shape[0] - 1))
            return umap.UMAP(n_components=2, random_state=seed, n_neighbors=n_neighbors).fit_transform(x), "UMAP"
    c = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    coords = c @ vt[:2].T
    if coords.shape[1] < 2:  # 1-D data
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    var = s ** 2
    explained = var[:2].sum() / var.sum() if var.sum() > 0 else 0.0
    return coords, f"PCA ({100 * explained:.0f}% var.)"


def plot_embeddings(img, txt, labels, path, title: Optional[str] = None, method: str = "pca",
                    seed: int = 0, max_pair_lines: int = 60) -> str:
    """Two panels of a joint 2-D map of both modalities: coloured by modality, and by class.

    ``img`` and ``txt`` are paired ``(N, D)`` embeddings (L2-normalised here); one projection is
    fitted on the stacked ``[img; txt]`` so the gap is visible as a displacement between the two
    clouds. Faint lines join up to ``max_pair_lines`` true pairs in the first panel. ``labels``
    (length N) colours the second panel (images as circles, texts as triangles); with ``labels``
    None that panel says so. Returns ``str(path)`` (a PNG).
    """
    a, b = _unit_rows(img), _unit_rows(txt)
    if a.shape != b.shape:
        raise ValueError(f"img and txt must have the same shape, got {a.shape} and {b.shape}")
    n = a.shape[0]
    xy, used = project_2d(np.concatenate([a, b]), method=method, seed=seed)
    pi, pt = xy[:n], xy[n:]

    fig, (ax1, ax2) = _figure(2)
    for i in range(min(n, max_pair_lines)):
        ax1.plot([pi[i, 0], pt[i, 0]], [pi[i, 1], pt[i, 1]], color="0.75", lw=0.5, zorder=1)
    ax1.scatter(pi[:, 0], pi[:, 1], s=8, c=MODALITY_COLORS["image"], label="image", zorder=2, alpha=0.7)
    ax1.scatter(pt[:, 0], pt[:, 1], s=8, c=MODALITY_COLORS["text"], label="text", zorder=2, alpha=0.7, marker="^")
    ci, ct = pi.mean(axis=0), pt.mean(axis=0)
    ax1.scatter(*ci, s=120, c=MODALITY_COLORS["image"], marker="X", edgecolors="k", zorder=3)
    ax1.scatter(*ct, s=120, c=MODALITY_COLORS["text"], marker="X", edgecolors="k", zorder=3)
    gap = float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))
    ax1.set_title(f"by modality (gap = {gap:.3f}; X = centroids)")
    ax1.legend(loc="best", fontsize=8)

    if labels is None:
        ax2.text(0.5, 0.5, "no class labels", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_title("by class")
    else:
        y = np.asarray(labels)
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {y.shape}")
        classes = np.unique(y)
        cmap_name = "tab10" if len(classes) <= 10 else "tab20"
        from matplotlib import colormaps

        cmap = colormaps[cmap_name]
        for j, cl in enumerate(classes):
            color = cmap(j % cmap.N)
            m = y == cl
            ax2.scatter(pi[m, 0], pi[m, 1], s=8, color=color, alpha=0.7, label=str(cl))
            ax2.scatter(pt[m, 0], pt[m, 1], s=10, color=color, alpha=0.7, marker="^")
        ax2.set_title("by class (o image, ^ text)")
        if len(classes) <= 20:
            ax2.legend(loc="best", fontsize=7, ncol=2, markerscale=1.5)
    for ax in (ax1, ax2):
        ax.set_xlabel(f"{used} 1")
        ax.set_ylabel(f"{used} 2")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _shift_runs(results) -> dict:
    """Normalise shift results to ``{run label: [rows with 'alpha']}``."""
    if isinstance(results, Mapping) and "shift" in results and isinstance(results["shift"], list):
        return {results.get("label", ""): results["shift"]}
    if isinstance(results, Mapping):
        out = {}
        for k, v in results.items():
            out[str(k)] = v["shift"] if isinstance(v, Mapping) else v
        return out
    return {"": list(results)}


def plot_shift_curve(results, path, metrics: Optional[Sequence[str]] = None, title: Optional[str] = None) -> str:
    """Metrics vs alpha for the Liang et al. shift diagnostic (``evaluate --shift``).

    ``results`` is a list of rows ``{"alpha": a, "gap": ..., "i2t_r1": ...}``, or a dict
    ``{run label: rows}`` (one line per run), or an evaluator result holding a ``"shift"`` list.
    One panel per metric (default: every numeric key but ``alpha``); dotted lines mark
    alpha = 0 (as trained) and alpha = 1 (centroids moved together). Returns ``str(path)``.
    """
    runs = _shift_runs(results)
    runs = {k: sorted(v, key=lambda r: r["alpha"]) for k, v in runs.items() if v}
    if not runs:
        raise ValueError("no shift results to plot")
    if metrics is None:
        metrics = []
        for rows in runs.values():
            for key, val in rows[0].items():
                if key != "alpha" and isinstance(val, (int, float)) and key not in metrics:
                    metrics.append(key)
    if not metrics:
        raise ValueError("shift results hold no metric besides alpha")
    fig, axes = _figure(len(metrics), width=4.0, height=3.6)
    for ax, metric in zip(axes, metrics):
        for label, rows in runs.items():
            pts = [(r["alpha"], r[metric]) for r in rows if r.get(metric) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=label or None)
        for x in (0.0, 1.0):
            ax.axvline(x, color="0.6", ls=":", lw=1)
        ax.set_xlabel("alpha (shift along the gap)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    if any(runs):  # some run has a label
        axes[0].legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _records_from_path(p) -> List[dict]:
    p = Path(p)
    if p.is_dir():
        for cand in (p / "checkpoints" / "results.jsonl", p / "results.jsonl"):
            if cand.is_file():
                p = cand
                break
        else:
            raise FileNotFoundError(f"no results.jsonl in {p} or {p / 'checkpoints'}")
    if not p.is_file():
        raise FileNotFoundError(f"results file not found: {p}")
    records = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i}: not a JSON object: {e}") from e
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _run_name(p) -> str:
    p = Path(p)
    if p.is_dir():
        return p.name
    if p.parent.name == "checkpoints":
        return p.parent.parent.name
    return p.parent.name or p.stem


def read_results_jsonl(src) -> dict:
    """``{run name: [records]}`` from a path, a list of paths, or a dict ``{name: path or records}``.

    A path may be a ``results.jsonl`` file or a run folder (``LOGDIR/NAME``, whose
    ``checkpoints/results.jsonl`` is read); the run name is ``NAME``.
    """
    if isinstance(src, (str, Path)):
        src = [src]
    if isinstance(src, Mapping):
        return {str(k): (list(v) if not isinstance(v, (str, Path)) else _records_from_path(v)) for k, v in src.items()}
    runs = {}
    for p in src:
        name = _run_name(p)
        base, i = name, 2
        while name in runs:
            name, i = f"{base}#{i}", i + 1
        runs[name] = _records_from_path(p)
    return runs


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_gap_over_training(results_jsonl_paths_or_dict, path, keys: Optional[Iterable[str]] = None,
                           title: Optional[str] = None) -> str:
    """Gap vs epoch per run, from open_clip's ``checkpoints/results.jsonl``.

    Each line of a results file is one evaluation (a JSON object); the x value is its
    ``"epoch"`` (the line number when absent). Plotted: ``keys`` when given, otherwise every
    numeric key whose name contains ``gap`` (e.g. ``"val/gap"``, ``"gap"``,
    ``"relative_gap"``); each (run, key) is one line, keys ending in a plain ``gap`` on the
    left panel and other gap-like keys (relative gap ...) on a second one when present.
    Raises ``ValueError`` when no record holds such a key. Returns ``str(path)``.
    """
    runs = read_results_jsonl(results_jsonl_paths_or_dict)
    wanted = list(keys) if keys is not None else None
    series = {}  # (run, key) -> [(x, y)]
    for run, records in runs.items():
        for i, rec in enumerate(records):
            x = rec.get("epoch", i + 1)
            x = x if _is_number(x) else i + 1
            for k, v in rec.items():
                match = (k in wanted) if wanted is not None else ("gap" in k.lower())
                if match and _is_number(v):
                    series.setdefault((run, k), []).append((x, float(v)))
    if not series:
        what = f"keys {wanted}" if wanted is not None else "a key containing 'gap'"
        raise ValueError(f"no evaluation record holds {what} (runs: {sorted(runs)})")

    def plain(k):
        return k.lower().split("/")[-1] in ("gap", "modality_gap")

    groups = [[s for s in series if plain(s[1])], [s for s in series if not plain(s[1])]]
    groups = [g for g in groups if g]
    fig, axes = _figure(len(groups), width=5.5, height=4.0)
    multiple_runs = len(runs) > 1
    for ax, group in zip(axes, groups):
        for run, key in group:
            pts = sorted(series[(run, key)])
            xs, ys = zip(*pts)
            label = f"{run}: {key}" if multiple_runs else key
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("gap" if plain(group[0][1]) else "gap-like measure")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title(title or "modality gap over training")
    return _save(fig, path)
