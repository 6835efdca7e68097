"""Reading webdataset shards: ``(key, image bytes, caption, label)`` per sample, and the
:class:`Sample` the writers and readers share.

Shared by the evaluator, the validation hook, the per-term diagnostics and the CLIP_benchmark
exporter (a module of its own, so that none of them imports another just to read shards).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from .check import expand_sources

#: the image members (and, for a folder source, the image files) the shards use, without the dot
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


@dataclass
class Sample:
    """One image-caption pair; ``image`` holds PNG bytes, ``label`` a class id or None."""

    key: str
    image: bytes
    caption: str
    label: Optional[int] = None


class DataError(ValueError):
    """Shards that cannot be evaluated (missing files, no complete samples)."""


def tar_samples(urls) -> Iterator[Dict[str, bytes]]:
    """webdataset's own tar reader over ``urls`` in order: one dict per sample, ``__key__`` (the
    member name up to the first dot of its basename) and one bytes value per lower-case extension.
    No shuffling and no splitting by node or worker: every caller sees every sample."""
    import webdataset as wds

    return wds.tarfile_to_samples()(wds.SimpleShardList(list(urls)))


def json_caption_text(meta, json_keys) -> Optional[str]:
    """The caption text of a sample whose captions are the ``.json`` fields ``json_keys`` (open_clip
    main's ``--json-text-key`` syntax, ``'a;b'``): its non-empty fields in key order, one per line
    (whitespace inside a field, line breaks included, becomes one space: the tokenizer reads it the
    same), or None when it has none."""
    from .captions import json_captions

    captions = [" ".join(c.split()) for c in json_captions(meta, json_keys)]
    return "\n".join(captions) if captions else None


def iter_shard_samples(pattern, stats: Optional[dict] = None,
                       json_keys=None) -> Iterator[Tuple[str, bytes, str, Optional[int]]]:
    """Stream ``(key, image bytes, caption, label or None)`` from webdataset tar shards.

    ``pattern`` is a brace pattern (``::`` separates several) or a list of paths. Members are
    grouped as webdataset does (consecutive members sharing the key = name up to the first dot
    of the basename). The caption is the ``.txt`` member, or with ``json_keys`` (``'a;b'``, as
    open_clip main's ``--json-text-key``) the non-empty fields of the ``.json`` member, one per line
    (:func:`json_caption_text`). Samples without an image or a caption are skipped and counted in
    ``stats["skipped"]``.
    """
    from .captions import _split_keys

    stats = {} if stats is None else stats
    stats.setdefault("skipped", 0)
    if json_keys is not None and not _split_keys(json_keys):
        raise DataError(f"the JSON caption keys {json_keys!r} name no key (expected e.g. 'caption_a;caption_b')")
    urls = expand_sources(pattern)
    if not urls:
        raise DataError(f"the pattern {pattern!r} names no shard")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}")
    stats["shards"] = len(urls)

    def caption_of(fields):
        if json_keys is None:
            return fields["txt"].decode("utf-8").strip() if "txt" in fields else None
        return json_caption_text(fields["json"], json_keys) if "json" in fields else None

    def complete(key, fields):
        image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
        caption = caption_of(fields) if image is not None else None
        if caption is None:
            stats["skipped"] += 1
            return None
        label = None
        if "cls" in fields:
            try:
                label = int(fields["cls"].decode("utf-8").strip())
            except ValueError as e:
                raise DataError(f"sample {key}: .cls is not an integer: {fields['cls'][:20]!r}") from e
        return key, image, caption, label

    for sample in tar_samples(urls):
        fields = {k: v for k, v in sample.items() if not k.startswith("__")}
        s = complete(sample["__key__"], fields)
        if s:
            yield s


def _decode_image(key: str, data: bytes):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:
        raise DataError(f"sample {key}: cannot decode the image: {e}") from e


def read_shards(pattern_or_paths) -> List[Sample]:
    """Read shards back (webdataset's tar reader) from a brace pattern or a list of tar paths, in
    order; a sample without an image gets ``image=None``, one without a caption ``caption=""``."""
    samples = []
    for f in tar_samples(expand_sources(pattern_or_paths)):
        image = next((f[e] for e in IMAGE_EXTS if e in f), None)
        label = int(f["cls"]) if "cls" in f else None
        samples.append(Sample(f["__key__"], image, f.get("txt", b"").decode("utf-8"), label))
    return samples
