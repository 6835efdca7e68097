"""A second bundled task with nuisance variation: digit *scenes* (issue 14, item 4).

Each of scikit-learn's 1,797 handwritten digits is drawn onto a 32x32 canvas with four nuisance
attributes chosen at random per image: ink colour (6), size (small/large), corner (4) and
background (dark/light), plus a jitter of up to 2 pixels. The caption names all of them ("a small
red seven in the top left, on a dark background"), so a caption describes its own image among
960 attribute combinations (instance retrieval is meaningful), while the class, the digit, is
only one of five things the caption and the image vary in. That is the setting where grouping by
class is not what the embeddings do by default: the group-level metrics (mixed-set V-measure
with the digit as label) have headroom, unlike the plain digits where every caption is about the
class only.

``write_scenes_dataset`` writes it like :func:`openclip_structure.shards.write_digits_dataset`
(train/val shards with ``.cls`` digit labels, class names and held-out zero-shot templates).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .shards import DIGIT_WORDS, DIGIT_ZEROSHOT_TEMPLATES, Sample, _png_bytes, write_dataset

INKS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
        "yellow": (235, 220, 40), "white": (245, 245, 245), "purple": (170, 60, 220)}
SIZES = {"small": 14, "large": 22}
CORNERS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
BACKGROUNDS = {"dark": (15, 15, 15), "light": (120, 120, 120)}

# {s} size, {i} ink colour, {d} digit (word or numeral), {c} corner, {b} background
SCENE_TEMPLATES = (  # at most 14 tokens each: the tiny configs' context is 16
    "a {s} {i} {d}, {c}, {b} background",
    "the digit {d} in {i}, {s}, at the {c} on {b}",
    "a {b} picture: {s} {i} {d} in the {c}",
    "{i} {d} written {s} in the {c}, {b} backdrop",
    "{c} corner: a {s} {d} in {i} ink on {b}",
    "on {b}, a {i} {d}, {s}, {c}",
)


def _render(px: np.ndarray, ink, size: int, corner, background, jitter, canvas: int) -> Image.Image:
    """One 8x8 digit (0..16) scaled to ``size`` and composited in ``ink`` onto ``background``."""
    alpha = Image.fromarray(np.round(px * (255.0 / 16.0)).clip(0, 255).astype(np.uint8), mode="L")
    alpha = np.asarray(alpha.resize((size, size), Image.BILINEAR), dtype=np.float32)[..., None] / 255.0
    img = np.empty((canvas, canvas, 3), dtype=np.float32)
    img[:] = background
    margin = canvas - size
    x = int(np.clip(corner[0] * margin + jitter[0], 0, margin))
    y = int(np.clip(corner[1] * margin + jitter[1], 0, margin))
    patch = img[y:y + size, x:x + size]
    img[y:y + size, x:x + size] = patch * (1 - alpha) + np.asarray(ink, dtype=np.float32) * alpha
    return Image.fromarray(np.round(img).clip(0, 255).astype(np.uint8), mode="RGB")


def scene_samples(image_size: int = 32, seed: int = 0) -> list[Sample]:
    """The 1,797 digits as captioned scenes; ``label`` is the digit, keys ``scenes_000000``, ...

    Attributes, template and word-vs-numeral are drawn with ``seed`` (same seed, same data)."""
    from sklearn.datasets import load_digits

    if image_size < max(SIZES.values()) + 4:
        raise ValueError(f"image_size {image_size} is too small for the largest digit ({max(SIZES.values())} px)")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    inks, sizes, corners, backs = (list(d) for d in (INKS, SIZES, CORNERS, BACKGROUNDS))
    samples = []
    for i, (px, y) in enumerate(zip(digits.images, digits.target)):
        ink, size = inks[rng.integers(len(inks))], sizes[rng.integers(len(sizes))]
        corner, back = corners[rng.integers(len(corners))], backs[rng.integers(len(backs))]
        jitter = rng.integers(-2, 3, size=2)
        template = SCENE_TEMPLATES[rng.integers(len(SCENE_TEMPLATES))]
        word = DIGIT_WORDS[y] if rng.random() < 0.5 else str(int(y))
        img = _render(px, INKS[ink], SIZES[size], CORNERS[corner], BACKGROUNDS[back], jitter, image_size)
        caption = template.format(s=size, i=ink, d=word, c=corner, b=back)
        samples.append(Sample(f"scenes_{i:06d}", _png_bytes(img), caption, int(y)))
    return samples


def write_scenes_dataset(out_dir, image_size: int = 32, seed: int = 0, **kw) -> dict:
    """The digit scenes as a dataset (train/val shards, class names = number words, the digits'
    held-out zero-shot templates), like ``write_digits_dataset``."""
    return write_dataset(scene_samples(image_size, seed), out_dir, seed=seed, classnames=list(DIGIT_WORDS),
                         templates=list(DIGIT_ZEROSHOT_TEMPLATES), **kw)
