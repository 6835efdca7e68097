"""Modality-gap and group-level metrics inside open_clip's own validation (``--val-data``).

open_clip's ``evaluate`` collects every validation image/text embedding on rank 0 and calls
``open_clip_train.train.get_clip_metrics`` (looked up at call time). The launcher wraps that
function, so the measures of :mod:`openclip_structure.evaluation.metrics` land in the same ``val/...``
tensorboard/wandb keys and the same ``checkpoints/results.jsonl`` line as open_clip's retrieval
metrics (the hooks that call these measures: :mod:`openclip_structure.integration.validation`):

* ``--val-structure-metrics gap`` (default): label-free measures computed from the embeddings
  open_clip already has (gap, cosine of true pairs, intra-modal cosines, Fang uniformity,
  relative gap, linear separability of the modalities).
* ``all``: also the group-level measures (k-means V-measure/NMI/ARI/homogeneity on the mixed
  image+text set and per modality, kNN and linear probe, class-level retrieval and zero-shot
  classification, see :func:`openclip_structure.evaluation.evaluator.labelled_metrics`), which need class labels: open_clip's
  validation loader drops every field but image and text, so rank 0 re-reads the webdataset
  validation shards with their ``<key>.cls`` label field (one extra pass over the validation
  set, reported in the log).
* ``none``: nothing is added.

With several captions per image (one per ``.txt`` line; on open_clip main with ``--json-text-key``
the named ``.json`` fields) and ``gap`` or ``all``, open_clip's retrieval keys and the gap measures
are replaced by their COCO-protocol values (:mod:`openclip_structure.evaluation.coco`), and the
group metrics use every caption. Both extra passes log their time or their error through
:func:`extra_pass`.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from . import metrics

LABEL_FREE: Dict[str, Callable] = {
    "modality_gap": metrics.modality_gap,
    "cos_true_pairs": metrics.cos_true_pairs,
    "intra_image_cos": lambda img, txt: metrics.mean_intra_modal_cosine(img),
    "intra_text_cos": lambda img, txt: metrics.mean_intra_modal_cosine(txt),
    "fang_uniformity": metrics.fang_uniformity,
    "relative_modality_gap": metrics.relative_modality_gap,
    "modality_separability": metrics.modality_separability,
}


def _as_tensor(features) -> torch.Tensor:
    """open_clip main hands the validation features over as a list of per-batch chunks."""
    return torch.cat(list(features)) if isinstance(features, (list, tuple)) else features


def gap_val_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                    image_key: str = "image") -> Dict[str, float]:
    """:data:`LABEL_FREE`; ``image_key`` names the first modality (open_clip main's CLAP: ``audio``,
    giving ``intra_audio_cos``)."""
    img = _as_tensor(image_features).float().cpu().numpy()
    txt = _as_tensor(text_features).float().cpu().numpy()
    return {(f"intra_{image_key}_cos" if name == "intra_image_cos" else name): float(fn(img, txt))
            for name, fn in LABEL_FREE.items()}


def first_sample_problem(pattern) -> str:
    """'' if the first validation sample of ``pattern`` has an image, a caption and a .cls
    label; else what is wrong (checked before training, so a run does not fail hours later)."""
    from ..data.reader import iter_shard_samples

    try:
        for _key, _image, _caption, label in iter_shard_samples(pattern):
            return "" if label is not None else f"the first sample of {pattern} has no .cls label"
        return f"no complete sample (image + txt) in {pattern}"
    except Exception as e:  # noqa: BLE001 - reported as a flag error
        return f"cannot read {pattern}: {e}"


def extra_pass(what: str, compute: Callable[[], Optional[Tuple[Dict[str, float], str]]]) -> Dict[str, float]:
    """Run one extra validation pass: ``compute()`` returns ``(metrics, what it read)`` (or None:
    nothing to add). Never raises: a problem is logged and ``{}`` returned, so a long run is not lost
    at its validation; the time of a pass that gave metrics is logged."""
    start = time.perf_counter()
    try:
        done = compute()
    except Exception as e:  # noqa: BLE001 - logged, training goes on
        logging.error(f"openclip-structure: {what} skipped this evaluation: {e}")
        return {}
    if not done:
        return {}
    out, read = done
    logging.info(f"openclip-structure: {what} on {read} (extra pass) in {time.perf_counter() - start:.1f}s")
    return out
