"""Labelled webdataset shards rewritten in CLIP_benchmark's local webdataset layout, so the
community's evaluator (``clip_benchmark eval``, LAION-AI/CLIP_benchmark) can score exported
models on the same held-out data as :mod:`openclip_structure.evaluation.evaluator`::

    python -m openclip_structure.benchmark_shards --data 'runs/demo/data/val/{00000..00001}.tar' \\
        --out cb/digits [--task classification|retrieval] [--classnames F] [--templates F]

The layout (``clip_benchmark.datasets.builder.build_wds_dataset``, dataset name ``wds/<any>``,
``--dataset_root`` = ``--out``)::

    OUT/test/0.tar, 1.tar, ...        samples: <key>.png + <key>.cls (class id) + <key>.txt (caption)
    OUT/test/nshards.txt              the number of tars
    OUT/dataset_type.txt              "classification" or "retrieval"
    OUT/classnames.txt                classification: line i = the name of class id i
    OUT/zeroshot_classification_templates.txt   classification: one template a line, {c} = class name

Class names and templates are resolved as by the evaluator (:func:`zeroshot.resolve_prompts`:
the given files, else the files beside the shards, else the ``.cls`` ids and open_clip's simple
templates), so CLIP_benchmark's zero-shot accuracy on OUT equals the evaluator's on ``--data``.
For retrieval each sample keeps its captions, one a line (CLIP_benchmark reads every line of the
``.txt`` as a caption of the image, the COCO protocol the evaluator uses); blank lines and the
spaces around a caption are dropped, as the evaluator drops them, so both score the same texts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import zeroshot
from ..data.reader import Sample
from ..data.writer import write_prompt_files, write_shards

TASKS = ("classification", "retrieval")


def write_benchmark_shards(pattern, out_dir, task: str = "classification", classnames_file=None,
                           templates_file=None, samples_per_shard: int = 256) -> dict:
    """Write the samples of ``pattern`` to ``out_dir`` in CLIP_benchmark's layout (module docstring).

    Returns ``{"root", "task", "num_samples", "num_shards"[, "classnames", "templates"]}``. Raises
    ``ValueError`` for an unknown task, shards without samples, or (classification) a sample
    without a ``.cls`` label.
    """
    from ..data.reader import DataError, iter_shard_samples

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    from .encoding import sample_captions

    samples: List[Sample] = [Sample(key.replace("/", "_"), image, "\n".join(sample_captions(caption)), label)
                             for key, image, caption, label in iter_shard_samples(pattern)]
    if not samples:
        raise DataError(f"no samples (image + txt caption) in {pattern}")
    unlabelled = [s.key for s in samples if s.label is None]
    if task == "classification" and unlabelled:
        raise ValueError(f"classification needs a .cls label in every sample; {len(unlabelled)} of "
                         f"{len(samples)} have none, e.g. {unlabelled[:3]} (use --task retrieval)")
    root = Path(out_dir)
    test = root / "test"
    if test.is_dir():
        for old in test.glob("*.tar"):
            old.unlink()
    info = write_shards(samples, test, samples_per_shard=samples_per_shard)
    # CLIP_benchmark reads test/{0..N-1}.tar: rename write_shards' zero-padded names
    for i in range(info["num_shards"]):
        (test / f"{i:05d}.tar").rename(test / f"{i}.tar")
    (test / "sizes.json").unlink(missing_ok=True)
    (test / "nshards.txt").write_text(f"{info['num_shards']}\n")
    (root / "dataset_type.txt").write_text(f"{task}\n")
    out = {"root": str(root.resolve()), "task": task, "num_samples": info["num_samples"],
           "num_shards": info["num_shards"]}
    for name in (zeroshot.CLASSNAMES_FILE, zeroshot.TEMPLATES_FILE):
        (root / name).unlink(missing_ok=True)
    if task == "classification":
        names, templates, _ = zeroshot.resolve_prompts([s.label for s in samples], pattern, classnames_file,
                                                       templates_file)
        out.update(write_prompt_files(root, names, [zeroshot.template_text(t) for t in templates]))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m openclip_structure.benchmark_shards",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--data", required=True, help="labelled webdataset shards, e.g. 'data/val/{00000..00001}.tar'")
    p.add_argument("--out", required=True, help="output root (CLIP_benchmark's --dataset_root)")
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--classnames", default=None, metavar="FILE",
                   help=f"class names, one a line (default: {zeroshot.default_prompt_source()})")
    p.add_argument("--templates", default=None, metavar="FILE", help="zero-shot templates with {c}, one a line")
    p.add_argument("--samples-per-shard", type=int, default=256)
    a = p.parse_args(argv)
    try:
        info = write_benchmark_shards(a.data, a.out, a.task, a.classnames, a.templates, a.samples_per_shard)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['num_samples']} samples in {info['num_shards']} shard(s) to {info['root']} ({a.task}); "
          f"evaluate with: clip_benchmark eval --dataset wds/NAME --dataset_root {info['root']} "
          f"--task zeroshot_{a.task} --model local-dir:EXPORTED --pretrained none")
    return 0
