"""``--val-data`` with several captions per image: the COCO protocol in open_clip's validation.

open_clip reads a validation sample's ``.txt`` as ONE text, so with one caption per line its
retrieval numbers (and the gap measures computed from its embeddings) are those of texts the model
never trains on: the lines joined. When the validation shards hold several captions per image,
rank 0 encodes them once more, every caption its own text (:mod:`openclip_structure.evaluation.encoding`),
and replaces open_clip's ``image_to_text_*``/``text_to_image_*`` keys and the gap measures by their
COCO-protocol values (:mod:`openclip_structure.evaluation.multicaption`): an image's rank is that of its
best-scoring caption, a caption's that of its image; ``num_texts`` is added. Single-caption
validation data is left exactly as open_clip scores it (the shards are scanned once per run to tell).

On open_clip 3.x the launcher's ``evaluate`` hook runs the pass (:class:`openclip_structure.integration.validation.ValidationHook`);
on open_clip main the same hook wraps main's ``evaluate(task, ...)`` and encodes with the task's
evaluation model (:func:`..integration.task.wrap_evaluate`). With main's ``--json-text-key 'a;b'``
(open_clip then reads ONE field per sample) the captions are those ``.json`` fields, each its own text.
"""
from __future__ import annotations

import logging
from typing import Dict

import numpy as np

from . import multicaption as MC
from .retrieval import best_match_ranks
from .encoding import encode_shards, sample_captions
from ..data.reader import iter_shard_samples

#: multicaption.gap_metrics key -> the validation key (validation.LABEL_FREE's names)
VAL_NAMES = {"gap": "modality_gap", "cos_true_pairs": "cos_true_pairs", "intra_image_cos": "intra_image_cos",
             "intra_text_cos": "intra_text_cos", "uniformity": "fang_uniformity",
             "relative_gap": "relative_modality_gap", "separability": "modality_separability"}


def has_multi_captions(pattern, json_keys=None) -> bool:
    """Whether some sample of the shards has two or more captions (``.txt`` lines, or with
    ``json_keys`` the non-empty fields of its ``.json``)."""
    return any(len(sample_captions(caption)) > 1
               for _key, _image, caption, _label in iter_shard_samples(pattern, json_keys=json_keys))


def open_clip_rank_metrics(img: np.ndarray, txt: np.ndarray, owners: np.ndarray) -> Dict[str, float]:
    """open_clip's ``get_clip_metrics`` keys (mean/median rank, R@1/5/10, 1-based ranks) under the COCO
    protocol: ``image_to_text`` per image over its best caption, ``text_to_image`` per caption."""
    ids = np.arange(img.shape[0])
    out = {}
    for name, ranks in (("image_to_text", best_match_ranks(img, txt, ids, owners)),
                        ("text_to_image", best_match_ranks(txt, img, owners, ids))):
        out[f"{name}_mean_rank"] = float(ranks.mean() + 1)
        out[f"{name}_median_rank"] = float(np.floor(np.median(ranks)) + 1)
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float(np.mean(ranks < k))
    return out


class CocoValidation:
    """One per training job: remembers whether the validation shards are multi-caption."""

    def __init__(self):
        self.multi: Dict[tuple, bool] = {}

    def compute(self, model, preprocess, tokenizer, args):
        """``(the COCO-protocol replacements for this evaluation, what was read)``, or None for
        single-caption data. The captions are the ``.txt`` lines, or on open_clip main with
        ``--json-text-key`` the named ``.json`` fields. The validation hook runs it as an extra pass
        (:func:`openclip_structure.evaluation.in_training.extra_pass`: never raises, open_clip's numbers stay)."""
        pattern, keys = args.val_data, getattr(args, "json_text_key", None) or None
        if (pattern, keys) not in self.multi:
            self.multi[pattern, keys] = has_multi_captions(pattern, keys)
            if self.multi[pattern, keys]:
                source = f"the .json fields {keys!r}" if keys else "the .txt lines"
                logging.info("openclip-structure: the validation shards hold several captions per image "
                             f"({source}): retrieval and gap metrics use the COCO protocol (every caption its own "
                             "text)")
        if not self.multi[pattern, keys]:
            return None
        stats: dict = {}
        img, txt, _ = encode_shards(model, preprocess, tokenizer, pattern, batch_size=args.batch_size,
                                    device=args.device, stats=stats, json_keys=keys)
        owners = MC.caption_owners(stats["text_image"], len(img), len(txt))
        if owners is None:
            return None
        out = open_clip_rank_metrics(img, txt, owners)
        gap = MC.gap_metrics(img, txt, owners, ks=(1,))
        out.update({VAL_NAMES[k]: v for k, v in gap.items() if k in VAL_NAMES})
        out["num_texts"] = float(len(txt))
        return out, f"{len(img)} images / {len(txt)} captions"
