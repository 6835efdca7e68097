"""Write image-caption samples as webdataset shards that ``open_clip_train`` reads.

A shard folder holds ``00000.tar``, ``00001.tar``, ... and ``sizes.json`` (tar basename -> sample
count, which open_clip uses to count samples). Each sample is the tar members ``<key>.png`` (RGB
PNG), ``<key>.txt`` (UTF-8 caption) and, when a label is known, ``<key>.cls`` (the integer class id
as ASCII text). Tars are written deterministically (fixed member order, mtime 0, uid/gid 0), so the
same inputs give byte-identical files. A dataset is a train/val split of such folders plus the
zero-shot prompt files (:func:`write_dataset`); the command line is :mod:`openclip_structure.data.cli`.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .reader import Sample
from .sources import DIGIT_WORDS, DIGIT_ZEROSHOT_TEMPLATES, digits_samples


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: list[Sample], out_dir, samples_per_shard: int = 256,
                 num_shards: int | None = None) -> dict:
    """Write ``samples`` (in order) to ``out_dir/00000.tar``, ... and ``sizes.json``.

    Shards hold ``samples_per_shard`` samples each, or, when ``num_shards`` is given,
    that many shards with sizes differing by at most one. Old ``NNNNN.tar`` files in
    ``out_dir`` are removed first. Returns ``{"pattern", "num_samples", "num_shards"}``,
    the pattern being an absolute brace pattern such as ``/abs/out/{00000..00007}.tar``.
    """
    if not samples:
        raise ValueError("no samples to write")
    keys = [s.key for s in samples]
    bad = [k for k in keys if not k or "." in k]
    if bad:
        raise ValueError(f"sample keys must be non-empty and contain no dots: {bad[:5]}")
    dupes = sorted(k for k, c in Counter(keys).items() if c > 1)
    if dupes:
        raise ValueError(f"duplicate sample keys: {dupes[:5]}")
    n = len(samples)
    if num_shards is None:
        bounds = [*range(0, n, samples_per_shard), n]
    elif 1 <= num_shards <= n:
        bounds = np.linspace(0, n, num_shards + 1).round().astype(int).tolist()
    else:
        raise ValueError(f"cannot split {n} samples into {num_shards} non-empty shards")
    num_shards = len(bounds) - 1

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9][0-9][0-9][0-9].tar"):
        old.unlink()
    sizes = {}
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        name = f"{s:05d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples[lo:hi]:
                if sample.label is not None:
                    _add(tar, f"{sample.key}.cls", str(int(sample.label)).encode())
                _add(tar, f"{sample.key}.png", sample.image)
                _add(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
        sizes[name] = hi - lo
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    pattern = str(out / "00000.tar") if num_shards == 1 else f"{out}/{{00000..{num_shards - 1:05d}}}.tar"
    return {"pattern": pattern, "num_samples": n, "num_shards": num_shards}


def split_train_val(samples: list[Sample], val_fraction: float = 0.25, seed: int = 0):
    """Split deterministically into ``(train, val)``, stratified by label.

    Each label group (None counts as one group) sends ``round(len * val_fraction)``
    samples to val, kept between 1 and len-1 so every class with two or more samples
    appears in both. Both lists come back shuffled (with ``seed``).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[s.label].append(i)
    train_idx, val_idx = [], []
    for label in sorted(groups, key=lambda x: (x is None, x)):
        idx = rng.permutation(groups[label]).tolist()
        k = min(max(round(len(idx) * val_fraction), 1), len(idx) - 1)
        val_idx += idx[:k]
        train_idx += idx[k:]
    return ([samples[i] for i in rng.permutation(train_idx).astype(int)],
            [samples[i] for i in rng.permutation(val_idx).astype(int)])


def write_prompt_files(out_dir, classnames=None, templates=None) -> dict:
    """Write ``classnames.txt`` / ``zeroshot_classification_templates.txt`` (CLIP_benchmark's
    names; see :mod:`openclip_structure.evaluation.zeroshot`) into ``out_dir``; returns the written paths."""
    from ..evaluation.zeroshot import CLASSNAMES_FILE, TEMPLATES_FILE

    written = {}
    for key, name, lines in (("classnames", CLASSNAMES_FILE, classnames), ("templates", TEMPLATES_FILE, templates)):
        if lines:
            bad = [ln for ln in lines if not str(ln).strip() or "\n" in str(ln)]
            if bad:
                raise ValueError(f"{name}: entries must be non-empty single lines, got {bad[:3]}")
            if key == "templates" and any("{c}" not in t for t in lines):
                raise ValueError(f"{name}: every template needs a {{c}} placeholder, got {list(lines)[:3]}")
            path = Path(out_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")
            written[key] = str(path.resolve())
    return written


def write_dataset(samples: list[Sample], out_dir, val_fraction: float = 0.25, train_shards: int = 8,
                  val_shards: int = 2, seed: int = 0, classnames=None, templates=None) -> dict:
    """Split ``samples`` and write ``out_dir/train/`` and ``out_dir/val/`` shard folders.

    ``classnames`` (class id i = name i) and ``templates`` (``{c}`` placeholders), when given, go
    to ``out_dir/classnames.txt`` and ``out_dir/zeroshot_classification_templates.txt``, where the
    evaluator's zero-shot classification finds them. Returns (and saves as
    ``out_dir/dataset.json``) ``{"train": ..., "val": ..., "num_classes": K or None[, "prompts":
    paths]}``, the splits being :func:`write_shards` results.
    """
    train, val = split_train_val(samples, val_fraction, seed)
    out = Path(out_dir)
    labels = {s.label for s in samples if s.label is not None}
    info = {
        "train": write_shards(train, out / "train", num_shards=train_shards),
        "val": write_shards(val, out / "val", num_shards=val_shards),
        "num_classes": len(labels) or None,
    }
    prompts = write_prompt_files(out, classnames, templates)
    if prompts:
        info["prompts"] = prompts
    (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def write_digits_dataset(out_dir, image_size: int = 32, seed: int = 0, **kw) -> dict:
    """The bundled digits as a dataset (:func:`write_dataset`) with their class names (number
    words) and the held-out zero-shot templates ``DIGIT_ZEROSHOT_TEMPLATES``."""
    return write_dataset(digits_samples(image_size, seed), out_dir, seed=seed, classnames=list(DIGIT_WORDS),
                         templates=list(DIGIT_ZEROSHOT_TEMPLATES), **kw)
