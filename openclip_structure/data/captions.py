"""The captions of a sample, and the caption/text-view pairs of ``--text-aug`` (pure Python).

A sample may hold several captions (COCO-style and recaptioned data):

* one caption per line of its caption text (webdataset ``<key>.txt``, a CSV caption cell; the
  layout CLIP_benchmark's retrieval shards use): :func:`split_captions`;
* on open_clip main, the fields of its ``<key>.json`` named by ``--json-text-key 'a;b;c'``
  (recaptioned DataComp/LAION): :func:`json_captions`.

``--text-aug captions`` draws one caption as the caption the contrastive loss sees and a caption
with a DIFFERENT text as its view (:class:`CaptionPair`); ``--text-aug eda`` pairs the caption with
an EDA-style copy (:class:`EDAPair`). Both use Python's ``random`` (seeded per DataLoader worker by
torch) unless given an ``rng``.
"""
from __future__ import annotations

import json
import random
from typing import List, Optional, Sequence, Tuple

__all__ = ["EDA", "EDAPair", "split_captions", "json_captions", "CaptionPair"]


class EDA:
    """EDA-style caption perturbation (Wei & Zou 2019, the two operations that need no thesaurus):
    drop each word with probability ``p_drop`` (at least one word is kept), then swap ``n_swap``
    random pairs of words."""

    def __init__(self, p_drop: float = 0.1, n_swap: int = 1):
        self.p_drop, self.n_swap = float(p_drop), int(n_swap)

    def __call__(self, caption: str, rng=random) -> str:
        words = str(caption).split()
        if not words:
            return str(caption)
        kept = [w for w in words if rng.random() >= self.p_drop] or [rng.choice(words)]
        for _ in range(self.n_swap):
            if len(kept) >= 2:
                i, j = rng.sample(range(len(kept)), 2)
                kept[i], kept[j] = kept[j], kept[i]
        return " ".join(kept)


class EDAPair:
    """``--text-aug eda``: (the caption, its EDA copy)."""

    def __init__(self, eda: Optional[EDA] = None):
        self.eda = eda or EDA()

    def __call__(self, text: str, rng=random) -> Tuple[str, str]:
        return str(text), self.eda(text, rng)


def split_captions(text: str) -> List[str]:
    """The captions of one sample: the non-empty lines of its caption text, stripped."""
    return [line.strip() for line in str(text).splitlines() if line.strip()]


def _split_keys(keys) -> Tuple[str, ...]:
    parts = keys.split(";") if isinstance(keys, str) else keys
    return tuple(k.strip() for k in parts if isinstance(k, str) and k.strip())


def json_captions(meta, keys) -> List[str]:
    """The non-empty string values of ``keys`` (a ``;``-separated string or a list) in the JSON
    metadata ``meta`` (a dict, or its text/bytes), stripped, in key order. Unreadable JSON gives []."""
    if isinstance(meta, (bytes, bytearray)):
        meta = meta.decode("utf-8", errors="replace")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return []
    if not isinstance(meta, dict):
        return []
    values = (meta.get(k) for k in _split_keys(keys))
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


class CaptionPair:
    """``--text-aug captions``: (caption, text view), two captions of the same sample with DIFFERENT
    texts, drawn at random each time: the caption uniformly over the sample's captions, the view
    uniformly over its captions whose text differs from it.

    The captions are the lines of the caption text, or with ``json_keys`` (open_clip main's
    ``--json-text-key``) the non-empty fields of the sample's JSON (the caption text is then the
    raw JSON); ``json_caption`` (open_clip main's own ``JsonCaptionExtractor(keys, probs)``, so
    ``--json-text-key-probs`` keeps its meaning) then picks the caption. A sample whose captions
    are all the same text (a single caption, duplicate lines) gets its EDA copy as the view; one
    with no caption keeps its text unchanged for both.
    """

    def __init__(self, fallback: Optional[EDAPair] = None, json_keys: Optional[Sequence[str]] = None,
                 json_caption=None):
        self.fallback = fallback or EDAPair()
        self.json_keys = _split_keys(json_keys) if json_keys else None
        if self.json_keys == ():
            raise ValueError("CaptionPair: json_keys names no key")
        self.json_caption = json_caption

    def captions(self, text) -> List[str]:
        if self.json_keys is not None:
            return json_captions(text, self.json_keys)
        return split_captions(text)

    def __call__(self, text, rng=random) -> Tuple[str, str]:
        captions = self.captions(text)
        if not captions:
            return self.fallback("" if self.json_keys is not None else str(text), rng)
        if self.json_caption is not None:
            caption = self.json_caption(text)
        else:
            caption = captions[rng.randrange(len(captions))]
        others = [c for c in captions if c != caption]
        if others:
            return caption, others[rng.randrange(len(others))]
        return self.fallback(caption, rng)
