"""Encoding the image-caption samples of webdataset shards with a model, every caption its own text.

A sample's ``<key>.txt`` may hold several captions, one per line (COCO-style and recaptioned data;
the layout CLIP_benchmark's retrieval shards use), or its ``<key>.json`` the fields named by
``json_keys`` (open_clip main's ``--json-text-key``): each non-empty line (field) is its own text
and ``stats["text_image"]`` maps it to its image row (the COCO protocol of
:mod:`openclip_structure.evaluation.multicaption`). A single-line caption gives one text per image, in image
order, exactly as before.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..data.captions import split_captions
from ..data.reader import DataError, _decode_image, iter_shard_samples

__all__ = ["encode_shards", "sample_captions"]


def sample_captions(text: str) -> list:
    """The captions of one sample's caption text: its non-empty lines, stripped (an empty text stays
    one empty caption, as a single-caption reader sees it)."""
    return split_captions(text) or [str(text).strip()]


@torch.no_grad()
def encode_shards(model, preprocess, tokenizer, pattern, batch_size: int = 256, device=None,
                  max_samples: Optional[int] = None, stats: Optional[dict] = None, json_keys=None):
    """Encode the images and captions of webdataset shards.

    Returns ``(img [N, D] float32, txt [M, D] float32, labels [N] int64 or None)`` with
    L2-normalised rows: image ``i`` is sample ``i`` in shard order (the first ``max_samples``
    samples when given), text ``j`` is caption ``j`` (every caption of every sample, in order),
    ``M == N`` with one caption per sample. With ``json_keys`` (``'a;b'``, open_clip main's
    ``--json-text-key`` syntax) a sample's captions are those ``.json`` fields, each its own text
    (:func:`openclip_structure.data.reader.iter_shard_samples`). ``labels`` is None unless every
    sample has a ``.cls``.
    ``stats`` (a dict, optional) receives ``num_samples``, ``num_texts``, ``num_labelled``,
    ``skipped``, ``shards``, ``captions`` (the caption texts, in text order) and ``text_image``
    (int64 [M], the image row of each text). Raises :class:`DataError` when there is no complete
    sample.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = {} if stats is None else stats
    dev = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    imgs, txts, labels, captions, owners = [], [], [], [], []
    batch: list = []

    def flush():
        if not batch:
            return
        x = torch.stack([preprocess(_decode_image(k, b)) for k, b, _, _ in batch]).to(dev)
        per_sample = [sample_captions(c) for _, _, c, _ in batch]
        texts = [c for caps in per_sample for c in caps]
        first = len(labels)
        fi = model.encode_image(x, normalize=True)
        imgs.append(fi.float().cpu().numpy())
        for start in range(0, len(texts), batch_size):  # at most batch_size texts per text-tower call
            ft = model.encode_text(tokenizer(texts[start:start + batch_size]).to(dev), normalize=True)
            txts.append(ft.float().cpu().numpy())
        labels.extend(lbl for _, _, _, lbl in batch)
        captions.extend(texts)
        owners.extend(first + i for i, caps in enumerate(per_sample) for _ in caps)
        batch.clear()

    try:
        for sample in iter_shard_samples(pattern, stats, json_keys=json_keys):
            if max_samples is not None and len(labels) + len(batch) >= max_samples:
                break
            batch.append(sample)
            if len(batch) == batch_size:
                flush()
        flush()
    finally:
        model.train(was_training)
    n = len(labels)
    stats["num_samples"] = n
    stats["num_texts"] = len(captions)
    stats["num_labelled"] = sum(lbl is not None for lbl in labels)
    stats["captions"] = captions
    stats["text_image"] = np.asarray(owners, dtype=np.int64)
    if n == 0:
        caption = "txt caption" if json_keys is None else f"a non-empty .json field of {json_keys!r}"
        raise DataError(f"no samples (image + {caption}) in {pattern}"
                        + (f" ({stats['skipped']} incomplete samples skipped)" if stats.get("skipped") else ""))
    img, txt = np.concatenate(imgs), np.concatenate(txts)
    y = np.asarray(labels, dtype=np.int64) if stats["num_labelled"] == n else None
    return img, txt, y
