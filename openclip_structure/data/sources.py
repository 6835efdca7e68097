"""Image-caption samples from the sources the shard writer takes: scikit-learn's bundled handwritten
digits (no download), a folder of images with same-stem ``.txt`` captions, or a CSV in open_clip's
``--csv-*`` layout. Each gives a list of :class:`~openclip_structure.data.reader.Sample` (RGB PNG
bytes, caption, optional integer label) for :mod:`openclip_structure.data.writer`.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .reader import IMAGE_EXTS, Sample

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
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower()[1:] in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images ({', '.join('.' + e for e in IMAGE_EXTS)}) found under {root}")
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
    rels = [p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.suffix.lower()[1:] in IMAGE_EXTS]
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
