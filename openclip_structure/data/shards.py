"""Write image-caption pairs as webdataset shards that ``open_clip_train`` reads.

A shard folder holds ``00000.tar``, ``00001.tar``, ... and ``sizes.json`` (tar
basename -> sample count, which open_clip uses to count samples). Each sample is
the tar members ``<key>.png`` (RGB PNG), ``<key>.txt`` (UTF-8 caption) and, when a
label is known, ``<key>.cls`` (the integer class id as ASCII text). Tars are
written deterministically (fixed member order, mtime 0, uid/gid 0), so the same
inputs give byte-identical files.

Sources: scikit-learn's bundled handwritten digits (no download), a folder of
images with same-stem ``.txt`` captions, or a CSV in open_clip's ``--csv-*``
layout. All go through the same writer, e.g.::

    python -m openclip_structure.shards --source digits --out data/digits
    python -m openclip_structure.shards --source folder --path my_images --out data/mine
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w}: number word, {n}: numeral
DIGIT_TEMPLATES = (
    "a handwritten {w}",
    "the digit {n} written by hand",
    "a scanned image of the number {w}",
    "a small grayscale picture of a handwritten {n}",
    "a blurry photo of the digit {w}",
    "the number {n}, scrawled in pen",
    "a low resolution scan of a handwritten {w}",
    "someone's handwriting showing a {n}",
    "a pixelated {w} drawn by a person",
    "an image of the numeral {n}",
    "a handwritten digit: {w}",
    "a tiny black and white {n} written by hand",
)

# Held-out prompts for zero-shot classification ({c}: the class name, a number word). None of
# them is a training caption (tested), so zero-shot accuracy measures transfer to unseen phrasing.
DIGIT_ZEROSHOT_TEMPLATES = (
    "a photo of the number {c}.",
    "a drawing of a {c}.",
    "a picture showing a {c}.",
    "this digit is a {c}.",
    "an example of the digit {c}.",
    "a {c}, written down.",
)


@dataclass
class Sample:
    """One image-caption pair; ``image`` holds PNG bytes, ``label`` a class id or None."""

    key: str
    image: bytes
    caption: str
    label: int | None = None


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _load_png(path: Path, image_size: int | None) -> bytes:
    """Read any image as RGB PNG bytes; when ``image_size`` is given, resize the shorter side to it."""
    try:
        with Image.open(path) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # PIL raises several types for broken files
        raise ValueError(f"cannot read image {path}: {e}") from e
    if image_size:
        w, h = img.size
        scale = image_size / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    return _png_bytes(img)


def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def digits_samples(image_size: int = 32, seed: int = 0) -> list[Sample]:
    """The 1,797 scikit-learn handwritten digits as captioned RGB images.

    Intensities 0..16 are scaled to 0..255 (ink is bright on black), the 8x8
    images upscaled bilinearly to ``image_size`` squared. Each caption comes from
    one of ``DIGIT_TEMPLATES`` (chosen with ``seed``), naming the digit as a word
    or a numeral; ``label`` is the digit. Keys are ``digits_000000``, ...
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    choice = np.random.default_rng(seed).integers(len(DIGIT_TEMPLATES), size=len(pixels))
    samples = []
    for i, (px, y, t) in enumerate(zip(pixels, digits.target, choice)):
        img = Image.fromarray(px, mode="L").resize((image_size, image_size), Image.BILINEAR)
        caption = DIGIT_TEMPLATES[t].format(w=DIGIT_WORDS[y], n=int(y))
        samples.append(Sample(f"digits_{i:06d}", _png_bytes(img.convert("RGB")), caption, int(y)))
    return samples


def folder_samples(path, image_size: int | None = None) -> list[Sample]:
    """Images anywhere under ``path``, each captioned by the same-stem ``.txt`` beside it.

    The label comes from a same-stem ``.cls`` file (an integer) if present; else, when
    every image sits inside a first-level subfolder, from that subfolder (sorted
    names -> 0..K-1); else None. Images are re-encoded as RGB PNG, the shorter side
    resized to ``image_size`` when given. Keys are the relative paths, sanitized.
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    rels = [p.relative_to(root) for p in files]
    in_classes = all(len(r.parts) > 1 for r in rels)
    class_ids = {c: i for i, c in enumerate(folder_class_names(root))} if in_classes else {}
    samples = []
    for p, r in zip(files, rels):
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise ValueError(f"missing caption for image {p}: expected {txt}")
        cls = p.with_suffix(".cls")
        if cls.is_file():
            label = int(cls.read_text().strip())
        else:
            label = class_ids.get(r.parts[0]) if in_classes else None
        key = _safe_key(str(r.with_suffix("")))
        samples.append(Sample(key, _load_png(p, image_size), txt.read_text(encoding="utf-8").strip(), label))
    return samples


def folder_class_names(path) -> list[str]:
    """Sorted first-level subfolder names (class id i = name i) when every image under ``path``
    sits inside one, else ``[]``."""
    root = Path(path)
    rels = [p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if not rels or not all(len(r.parts) > 1 for r in rels):
        return []
    return sorted({r.parts[0] for r in rels})


def csv_samples(path, img_key: str = "filepath", caption_key: str = "title", label_key: str | None = None,
                sep: str = ",", image_size: int | None = None) -> list[Sample]:
    """Rows of a CSV with open_clip's column conventions (``--csv-img-key``, ``--csv-caption-key``).

    Relative image paths resolve against the CSV's folder. The optional ``label_key``
    column holds integer ids, or class names mapped (sorted) to 0..K-1; empty cells
    give None. Note open_clip's own ``--csv-separator`` defaults to a tab; here ``sep``
    defaults to a comma. Keys are ``<csv stem>_<row index>``.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        for col in (img_key, caption_key, label_key):
            if col is not None and col not in columns:
                raise ValueError(f"column {col!r} not in {path}; available columns: {columns}")
        rows = list(reader)
    labels: list = [None] * len(rows)
    if label_key is not None:
        raw = [r[label_key].strip() for r in rows]
        names = sorted({v for v in raw if v})
        if all(re.fullmatch(r"-?\d+", v) for v in names):
            labels = [int(v) if v else None for v in raw]
        else:
            ids = {v: i for i, v in enumerate(names)}
            labels = [ids.get(v) for v in raw]
    prefix = _safe_key(path.stem)
    samples = []
    for i, (row, label) in enumerate(zip(rows, labels)):
        img_path = Path(row[img_key])
        if not img_path.is_absolute():
            img_path = path.parent / img_path
        samples.append(Sample(f"{prefix}_{i:06d}", _load_png(img_path, image_size), row[caption_key], label))
    return samples


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


def read_shards(pattern_or_paths) -> list[Sample]:
    """Read shards back (webdataset's tar reader) from a brace pattern or a list of tar paths, in
    order; a sample without an image gets ``image=None``, one without a caption ``caption=""``."""
    from .check import expand_sources
    from .reader import tar_samples

    samples = []
    for f in tar_samples(expand_sources(pattern_or_paths)):
        image = next((f[e[1:]] for e in IMAGE_EXTS if e[1:] in f), None)
        label = int(f["cls"]) if "cls" in f else None
        samples.append(Sample(f["__key__"], image, f.get("txt", b"").decode("utf-8"), label))
    return samples


def main(argv=None) -> int:
    """Command line: build train/val shards from digits, a folder or a CSV."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=("digits", "folder", "csv"), required=True)
    p.add_argument("--path", help="image folder (folder) or CSV file (csv)")
    p.add_argument("--out", required=True, help="output folder (gets train/, val/, dataset.json)")
    p.add_argument("--image-size", type=int, default=None,
                   help="digits: side length (default 32); folder/csv: shorter side (default: keep size)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--train-shards", type=int, default=8)
    p.add_argument("--val-shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-label-key", default=None)
    p.add_argument("--csv-separator", default=",")
    a = p.parse_args(argv)

    split = dict(val_fraction=a.val_fraction, train_shards=a.train_shards, val_shards=a.val_shards)
    if a.source == "digits":
        info = write_digits_dataset(a.out, a.image_size or 32, a.seed, **split)
    elif a.path is None:
        p.error(f"--source {a.source} needs --path")
    else:
        if a.source == "folder":
            samples = folder_samples(a.path, a.image_size)
            # subfolder names are the class names unless .cls files give the ids
            names = [] if any(Path(a.path).rglob("*.cls")) else folder_class_names(a.path)
        else:
            samples, names = csv_samples(a.path, a.csv_img_key, a.csv_caption_key, a.csv_label_key,
                                         a.csv_separator, a.image_size), None
        info = write_dataset(samples, a.out, seed=a.seed, classnames=names or None, **split)
    for split in ("train", "val"):
        s = info[split]
        print(f"{split}: {s['pattern']}  ({s['num_samples']} samples, {s['num_shards']} shards)")
    print(f"num_classes: {info['num_classes']}")
    print(f"wrote {Path(a.out).resolve() / 'dataset.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
