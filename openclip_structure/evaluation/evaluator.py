"""Standalone evaluation of open_clip checkpoints: modality gap and group-level structure.

    python -m openclip_structure.evaluate --model structure-tiny \\
        --pretrained logs/base/checkpoints/epoch_10.pt --data 'data/digits/val/{00000..00001}.tar' \\
        [--compare gap=logs/gap/checkpoints/epoch_10.pt exported=local-dir:exported/gap ...] \\
        [--shift] [--plots figs/] [--out results.json] [--max-samples N] [--batch-size 256] \\
        [--device cpu|cuda] [--seed 0]

Each checkpoint is loaded with plain open_clip: ``create_model_and_transforms(NAME,
pretrained=CKPT)`` for a training checkpoint (``torch.load(weights_only=True)``, ``module.``
stripped, strict keys) or ``create_model_and_transforms("local-dir:DIR")`` for an exported folder
(see :mod:`openclip_structure.evaluation.exporter`); the bundled configs (``structure-*``) are registered
first. Every sample of the webdataset shards (``<key>.png|jpg|...`` + ``<key>.txt``, optional
``<key>.cls`` integer label) is encoded with the model's validation preprocessing and its
tokenizer, L2-normalised, and scored with :func:`openclip_structure.evaluation.multicaption.all_metrics`
(gap measures, retrieval; when every sample has a label and there are at least two classes:
zero-shot classification (:mod:`openclip_structure.evaluation.zeroshot`), class-level retrieval and
group-level clustering / kNN / probe). A ``.txt`` with several lines holds several captions
(with ``--json-text-key 'a;b'`` the captions are those fields of ``<key>.json`` instead):
each is its own text, scored with the COCO protocol (:mod:`openclip_structure.evaluation.multicaption`);
the per-term diagnostics and the embedding plot, defined on pairs, use each image's first caption.

``--shift`` adds the diagnostic of Liang et al. 2022 ("Mind the Gap"): both modalities are moved
along the gap vector by ``alpha`` (:func:`metrics.shift_towards`; 0 = as trained, 1 = centroids
meet) and the gap, cosine of true pairs, R@1 both ways and the mixed-set V-measure are reported
per alpha. ``--plots DIR`` writes ``embeddings_<label>.png`` (2-D map by modality and by class)
and with ``--shift`` ``shift_<label>.png`` (and ``shift_curve.png`` overlaying every checkpoint).

The reusable pieces are :func:`load_model`, :func:`encode_shards`, :func:`evaluate_embeddings` and
:func:`evaluate_checkpoint`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import metrics as M
from . import multicaption as MC
from . import zeroshot
from ..data.captions import _split_keys
from .encoding import encode_shards
from ..data.reader import DataError, iter_shard_samples
from .tables import format_metrics_table, format_shift_table
from .exporter import CheckpointError
from .loading import LOCAL_DIR, load_model

__all__ = [
    "DataError",
    "CheckpointError",
    "DEFAULT_ALPHAS",
    "load_model",
    "iter_shard_samples",
    "encode_shards",
    "evaluate_embeddings",
    "labelled_metrics",
    "shift_diagnostic",
    "evaluate_checkpoint",
    "format_metrics_table",
    "format_shift_table",
    "main",
]

DEFAULT_ALPHAS = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


# ----------------------------------------------------------------------------- shards and encoding


# ----------------------------------------------------------------------------- metrics


def _labels_note(labels, stats: dict) -> Optional[str]:
    n = stats.get("num_samples")
    if labels is None:
        got = stats.get("num_labelled", 0)
        if got == 0:
            return "group metrics skipped: the shards have no .cls labels"
        return f"group metrics skipped: only {got} of {n} samples have a .cls label"
    if np.unique(labels).size < 2:
        return "group metrics skipped: all samples have the same label (need >= 2 classes)"
    return None


def shift_diagnostic(img, txt, labels=None, alphas: Sequence[float] = DEFAULT_ALPHAS, k: Optional[int] = None,
                     seed: int = 0, text_image=None) -> List[dict]:
    """Liang et al. 2022 shift: metrics after :func:`metrics.shift_towards` for each alpha.

    Rows ``{"alpha", "gap", "cos_true_pairs", "i2t_r1", "t2i_r1"[, "mixed_v_measure"]}``
    (the V-measure of k-means on the mixed image+text set, when labels are given). With
    ``text_image`` (several captions per image) the COCO protocol of :mod:`multicaption`.
    """
    owners = MC.caption_owners(text_image, len(img), len(txt))
    rows = []
    for alpha in alphas:
        a, b = M.shift_towards(img, txt, float(alpha))
        row = {"alpha": float(alpha), "gap": MC.modality_gap(a, b, owners),
               "cos_true_pairs": MC.cos_true_pairs(a, b, owners)}
        row.update(M.retrieval_recall(a, b, ks=(1,), text_image=owners))
        if labels is not None:
            y = np.asarray(labels)
            row["mixed_v_measure"] = M.cluster_scores(np.concatenate([a, b]),
                                                      np.concatenate([y, y if owners is None else y[owners]]),
                                                      k=k, seed=seed)["v_measure"]
        rows.append(row)
    return rows


def evaluate_embeddings(img, txt, labels=None, *, seed: int = 0, k: Optional[int] = None, shift: bool = False,
                        alphas: Sequence[float] = DEFAULT_ALPHAS, text_image=None) -> dict:
    """``{"metrics": all_metrics(...)[, "shift": rows]}`` for precomputed embeddings (``text_image``:
    the image row of each caption row, for several captions per image). Beside ``gap`` the metrics
    hold its noise floor, ``gap_floor`` and ``gap_floor_std`` (:func:`metrics.gap_noise_floor`, 200
    random splits of the pooled image + text rows).

    ``labels`` (one per image) with fewer than two classes are ignored (group metrics need two).
    """
    if labels is not None and np.unique(labels).size < 2:
        labels = None
    metrics = MC.all_metrics(img, txt, labels, text_image=text_image, k=k, seed=seed)
    floor, floor_std = M.gap_noise_floor(img, txt, seed=seed)  # beside the gap: its noise floor
    out = {"metrics": {}}
    for key, value in metrics.items():
        out["metrics"][key] = value
        if key == "gap":
            out["metrics"].update(gap_floor=floor, gap_floor_std=floor_std)
    if shift:
        out["shift"] = shift_diagnostic(img, txt, labels, alphas=alphas, k=k, seed=seed, text_image=text_image)
    return out


def labelled_metrics(model, tokenizer, img, txt, labels, pattern=None, classnames_file=None, templates_file=None,
                     seed: int = 0, text_image=None) -> dict:
    """The measures that need labels, as used by ``--val-data`` validation: group metrics
    (:func:`multicaption.group_metrics`), class-level retrieval and zero-shot classification
    (``zeroshot_top1`` ..., prompts from :func:`zeroshot.resolve_prompts`)."""
    out = zeroshot.zero_shot_metrics(model, tokenizer, img, labels, pattern, classnames_file, templates_file)[0]
    out.update(M.class_retrieval_recall(img, txt, labels, text_image=text_image))
    out.update(MC.group_metrics(img, txt, labels, text_image, seed=seed))
    return out


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def default_label(pretrained: Optional[str], model_name: Optional[str] = None) -> str:
    """A column name for a checkpoint: ``RUN/epoch_N`` for ``LOGS/RUN/checkpoints/epoch_N.pt``."""
    src = pretrained or model_name or "model"
    if src.startswith(LOCAL_DIR):
        return Path(src[len(LOCAL_DIR):].rstrip("/")).name or "local-dir"
    p = Path(src)
    if p.parent.name == "checkpoints" and p.parent.parent.name:
        return f"{p.parent.parent.name}/{p.stem}"
    return p.stem or src


def evaluate_checkpoint(model_name: Optional[str], pretrained: Optional[str], data, *, batch_size: int = 256,
                        device=None, max_samples: Optional[int] = None, seed: int = 0, k: Optional[int] = None,
                        shift: bool = False, alphas: Sequence[float] = DEFAULT_ALPHAS,
                        plots_dir=None, plot_method: str = "pca", label: Optional[str] = None,
                        zeroshot_classnames=None, zeroshot_templates=None, diagnostics: bool = False,
                        json_text_key: Optional[str] = None) -> dict:
    """Load one checkpoint, encode ``data`` and compute every measure.

    With labels, the metrics include zero-shot classification (:mod:`openclip_structure.evaluation.zeroshot`;
    class names and templates from ``zeroshot_classnames`` / ``zeroshot_templates`` files, else
    from the files beside the shards, else the ``.cls`` ids and open_clip's simple templates).
    Returns a JSON-serialisable dict: ``label``, ``model``, ``pretrained``, ``data``,
    ``num_samples`` (images), ``num_texts`` (captions: more than ``num_samples`` when a ``.txt``
    holds several lines, each then scored as its own text, the COCO protocol), ``num_classes``
    (None without labels), ``labels_used``, ``labels_note`` (why group metrics were skipped, else
    None), ``metrics`` (flat dict of floats; ``logit_scale`` is the model's 1/T), ``zeroshot_prompts``
    (class names, templates and their source, with labels), ``shift`` (with ``shift=True``),
    ``plots`` (paths, with ``plots_dir``) and timings. ``diagnostics=True`` adds
    the per-term structural diagnostics of :mod:`openclip_structure.evaluation.diagnostics` (one more pass
    over the shards for the augmented view and, when the checkpoint has them, the separation heads).
    ``json_text_key`` (``'a;b'``, open_clip main's ``--json-text-key`` syntax): the captions are
    those fields of each sample's ``.json``, each its own text, instead of the ``.txt`` lines.
    """
    label = label or default_label(pretrained, model_name)
    t0 = time.perf_counter()
    model, preprocess, tokenizer = load_model(model_name, pretrained, device)
    stats: dict = {}
    img, txt, labels = encode_shards(model, preprocess, tokenizer, data, batch_size=batch_size,
                                     device=next(model.parameters()).device, max_samples=max_samples, stats=stats,
                                     json_keys=json_text_key)
    t1 = time.perf_counter()
    note = _labels_note(labels, stats)
    used = labels if note is None else None
    owners = MC.caption_owners(stats["text_image"], len(img), len(txt))
    res = evaluate_embeddings(img, txt, used, seed=seed, k=k, shift=shift, alphas=alphas, text_image=owners)
    res["metrics"].update(M.caption_retrieval_recall(img, txt, stats["captions"], text_image=owners))
    paired = txt if owners is None else txt[MC.first_captions(owners, len(img))]  # one caption per image
    if used is not None:
        zs, res["zeroshot_prompts"] = zeroshot.zero_shot_metrics(model, tokenizer, img, used, data,
                                                                 zeroshot_classnames, zeroshot_templates)
        res["metrics"] = {**zs, **res["metrics"]}
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:  # the trained (or fixed) 1/T, as exp(param)
        res["metrics"]["logit_scale"] = float(scale.detach().float().exp().cpu())
    if diagnostics:
        from . import diagnostics as D

        heads = D.load_heads(model, pretrained)
        views = D.encode_structure_views(model, preprocess, tokenizer, data, heads, batch_size=batch_size,
                                         max_samples=max_samples, seed=seed, json_keys=json_text_key)
        res["metrics"].update(D.structure_diagnostics(img, paired, used, seed=seed, **views))
        res["separation_heads"] = heads is not None
    t2 = time.perf_counter()
    out = {
        "label": label,
        "model": model_name,
        "pretrained": pretrained,
        "data": str(data),
        "json_text_key": json_text_key,
        "num_samples": int(img.shape[0]),
        "num_texts": int(txt.shape[0]),
        "embed_dim": int(img.shape[1]),
        "num_classes": int(np.unique(labels).size) if labels is not None else None,
        "labels_used": used is not None,
        "labels_note": note,
        "skipped_samples": int(stats.get("skipped", 0)),
        **res,
    }
    if plots_dir is not None:
        from . import plots

        d = Path(plots_dir)
        out["plots"] = {"embeddings": plots.plot_embeddings(
            img, paired, labels, d / f"embeddings_{_safe(label)}.png", method=plot_method, seed=seed,
            title=f"{label}: gap {out['metrics']['gap']:.3f}, {img.shape[0]} pairs")}
        if shift:
            out["plots"]["shift"] = plots.plot_shift_curve({label: out["shift"]}, d / f"shift_{_safe(label)}.png",
                                                           title=f"{label}: shift along the gap")
    out["seconds"] = {"load_and_encode": round(t1 - t0, 3), "metrics": round(t2 - t1, 3)}
    return out


# ----------------------------------------------------------------------------- command line


def _parse_compare(entries: Sequence[str]) -> List[Tuple[str, str]]:
    out = []
    for e in entries:
        name, sep, ckpt = e.partition("=")
        if not sep or not name or not ckpt:
            raise ValueError(f"--compare expects NAME=CKPT (CKPT a file or local-dir:PATH), got {e!r}")
        out.append((name, ckpt))
    return out


def _alphas(text: str) -> List[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas expects comma-separated numbers, got {text!r}")
    if not vals:
        raise argparse.ArgumentTypeError("--alphas is empty")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openclip_structure.evaluate",
        description="Modality-gap and group-structure metrics of open_clip checkpoints on webdataset shards.",
    )
    p.add_argument("--model", help="open_clip model config name (e.g. structure-tiny); not needed for local-dir:")
    p.add_argument("--pretrained", help="training checkpoint (epoch_N.pt), local-dir:PATH, or an open_clip tag")
    p.add_argument("--label", help="column name for --pretrained (default: RUN/epoch_N or the file stem)")
    p.add_argument("--compare", nargs="+", default=[], metavar="NAME=CKPT",
                   help="further checkpoints, one column each (CKPT a file or local-dir:PATH; same --model)")
    p.add_argument("--data", required=True, help="webdataset shards, e.g. 'data/val/{00000..00001}.tar'")
    p.add_argument("--json-text-key", default=None, metavar="'KEY[;KEY...]'",
                   help="the captions are these fields of each sample's .json (';'-separated, as open_clip main's "
                        "--json-text-key), each its own text (COCO protocol), instead of the .txt lines")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-samples", type=int, default=None, help="use the first N samples only")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means, CV folds and train/test splits")
    p.add_argument("--k", type=int, default=None, help="k-means clusters (default: number of classes)")
    p.add_argument("--zeroshot-classnames", default=None, metavar="FILE",
                   help="class names for zero-shot classification, one per line (line i = .cls id i); "
                        f"default: {zeroshot.default_prompt_source()}")
    p.add_argument("--zeroshot-templates", default=None, metavar="FILE",
                   help="zero-shot prompt templates, one per line with a {c} placeholder (CLIP_benchmark's format)")
    p.add_argument("--diagnostics", action="store_true",
                   help="per-term structural diagnostics (geometric consistency, bridge distance of an augmented "
                        "view, shared/independent features of separation heads); one extra pass over --data")
    p.add_argument("--shift", action="store_true", help="Liang et al. shift diagnostic over --alphas")
    p.add_argument("--alphas", type=_alphas, default=list(DEFAULT_ALPHAS),
                   help="comma-separated shift amounts, e.g. --alphas=-0.5,0,1 (write '=' when the list "
                        "starts with a minus sign; default: -0.5,-0.25,...,1.5 in steps of 0.25)")
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG figures to DIR")
    p.add_argument("--plot-method", choices=("pca", "umap"), default="pca",
                   help="2-D projection of the embedding plot (umap needs umap-learn; PCA otherwise)")
    p.add_argument("--out", default=None, help="write all results (and this command) as JSON")
    return p


def _versions() -> dict:
    import open_clip

    return {"torch": torch.__version__, "open_clip": getattr(open_clip, "__version__", None),
            "numpy": np.__version__, "python": sys.version.split()[0]}


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    """Evaluate every requested checkpoint; print tables; return the JSON document."""
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.json_text_key is not None and not _split_keys(args.json_text_key):
        raise ValueError(f"--json-text-key {args.json_text_key!r} names no key (expected e.g. 'caption_a;caption_b')")
    sources: List[Tuple[str, str]] = []
    if args.pretrained or (args.model and args.model.startswith(LOCAL_DIR)):
        sources.append((args.label or default_label(args.pretrained, args.model), args.pretrained))
    sources += _parse_compare(args.compare)
    if not sources:
        raise ValueError("nothing to evaluate: pass --pretrained CKPT and/or --compare NAME=CKPT ...")
    seen, unique = set(), []
    for label, ckpt in sources:
        base, i = label, 2
        while label in seen:
            label, i = f"{base}#{i}", i + 1
        seen.add(label)
        unique.append((label, ckpt))

    results: Dict[str, dict] = {}
    for label, ckpt in unique:
        print(f"[{label}] evaluating {ckpt or args.model} on {args.data}", file=sys.stderr, flush=True)
        results[label] = evaluate_checkpoint(
            args.model, ckpt, args.data, batch_size=args.batch_size, device=args.device,
            max_samples=args.max_samples, seed=args.seed, k=args.k, shift=args.shift, alphas=args.alphas,
            plots_dir=args.plots, plot_method=args.plot_method, label=label,
            zeroshot_classnames=args.zeroshot_classnames, zeroshot_templates=args.zeroshot_templates,
            diagnostics=args.diagnostics, json_text_key=args.json_text_key)

    print(format_metrics_table(results))
    if args.shift:
        for label, r in results.items():
            print()
            print(format_shift_table(r["shift"], label))
    if args.plots and args.shift and len(results) > 1:
        from . import plots

        plots.plot_shift_curve({lbl: r["shift"] for lbl, r in results.items()},
                               Path(args.plots) / "shift_curve.png", title="shift along the gap")
    doc = {
        "command": "python -m openclip_structure.evaluate " + shlex.join(list(argv)),
        "argv": list(argv),
        "args": {k: v for k, v in vars(args).items()},
        "cwd": os.getcwd(),
        "versions": _versions(),
        "checkpoints": results,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n", encoding="utf-8")
        print(f"\nwrote {out}", file=sys.stderr)
    if args.plots:
        print(f"plots in {args.plots}", file=sys.stderr)
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        run(args, argv)
    except (CheckpointError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
