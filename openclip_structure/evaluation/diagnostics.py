"""Per-term structural diagnostics: does each regularizer do its structural job?

A method whose downstream metric does not move should at least show the structure it imposes.
One measure per term of Jiang et al. (CVPR 2023), computed on held-out embeddings (rows are
L2-normalised here; ``v`` image, ``t`` text, ``N`` pairs, means over ``j != k``):

- geometric consistency: ``gc_cross_asym`` = mean ``|<v_j,t_k> - <v_k,t_j>|`` (cross-modal
  symmetry) and ``gc_inmodal_diff`` = mean ``|<v_j,v_k> - <t_j,t_k>|`` (in-modal agreement);
  both 0 when the term's loss is 0.
- Brownian bridge: ``bridge_distance`` = mean ``||v^a_j - normalize(t v_j + (1-t) t_j)||`` of
  augmented-view image embeddings ``v^a`` to the image-caption bridge point (t = 0.25, the
  paper's), beside ``aug_view_distance`` = mean ``||v^a_j - v_j||`` for scale.
- deep feature separation (models with independent heads): per modality ``m``,
  ``sep_{m}_shared_ind_cos2`` = mean ``<z_j, z^i_j>^2`` (the orthogonality term),
  ``sep_{m}_shared_ind_abs_corr`` = mean absolute Pearson correlation between every shared and
  every independent feature dimension over the samples, and, with labels,
  ``sep_{m}_ind_probe_accuracy`` (linear probe of the class from the independent features: the
  information the modality-specific head keeps) beside ``sep_{m}_shared_probe_accuracy``.
- the gap loss: the gap measures of :mod:`openclip_structure.evaluation.metrics` (already reported).

:func:`structure_diagnostics` takes embeddings; :func:`encode_structure_views` encodes webdataset
shards with the augmented view and the separation heads of a checkpoint (:func:`load_heads`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from . import inputs as EI
from . import metrics as M

__all__ = ["gc_discrepancies", "bridge_distances", "separation_measures", "structure_diagnostics",
           "load_heads", "encode_structure_views"]

BRIDGE_T = 0.25


def gc_discrepancies(img, txt) -> dict:
    """``gc_cross_asym`` and ``gc_inmodal_diff`` (module docstring), in row blocks (no N x N x 2)."""
    a, b = M._paired(img, txt)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"img and txt need at least 2 pairs for pairwise discrepancies, got {n}")
    rows = max(1, EI._BLOCK_ELEMENTS // n)
    cross = inmodal = 0.0
    for start in range(0, n, rows):
        sl = slice(start, min(n, start + rows))
        # the diagonal (j == k) contributes exactly 0 to both sums
        cross += np.abs(a[sl] @ b.T - b[sl] @ a.T).sum(dtype=np.float64)
        inmodal += np.abs(a[sl] @ a.T - b[sl] @ b.T).sum(dtype=np.float64)
    pairs = n * (n - 1)
    return {"gc_cross_asym": float(cross / pairs), "gc_inmodal_diff": float(inmodal / pairs)}


def bridge_distances(img, txt, img_aug, t: float = BRIDGE_T) -> dict:
    """``bridge_distance`` and ``aug_view_distance`` (module docstring)."""
    a, b = M._paired(img, txt)
    aug = M._embeddings(img_aug, "img_aug")
    if aug.shape != a.shape:
        raise ValueError(f"img_aug must have the shape of img {a.shape}, got {aug.shape}")
    if not 0.0 < t < 1.0:
        raise ValueError(f"t must be in (0, 1), got {t}")
    mu = M._embeddings(t * a + (1.0 - t) * b, "bridge point")
    return {"bridge_distance": float(np.linalg.norm(aug - mu, axis=1).mean()),
            "aug_view_distance": float(np.linalg.norm(aug - a, axis=1).mean())}


def _abs_cross_corr(x: np.ndarray, y: np.ndarray) -> float:
    """Mean |Pearson correlation| over all (dimension of x, dimension of y) pairs; constant
    dimensions (zero variance) count as uncorrelated."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    sx, sy = np.sqrt((xc ** 2).sum(0)), np.sqrt((yc ** 2).sum(0))
    cov = xc.T.astype(np.float64) @ yc
    denom = np.outer(sx, sy)
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    return float(np.abs(corr).mean())


def separation_measures(shared, independent, labels=None, modality: str = "image", seed: int = 0) -> dict:
    """Deep-feature-separation measures of one modality (module docstring)."""
    z = M._embeddings(shared, f"{modality} shared")
    zi = M._embeddings(independent, f"{modality} independent")
    if z.shape[0] != zi.shape[0]:
        raise ValueError(f"{modality}: shared and independent features need the same rows, "
                         f"got {z.shape[0]} and {zi.shape[0]}")
    p = f"sep_{modality}_"
    out = {p + "shared_ind_cos2": float((np.einsum("ij,ij->i", z, zi, dtype=np.float64) ** 2).mean())
           if z.shape[1] == zi.shape[1] else float("nan"),
           p + "shared_ind_abs_corr": _abs_cross_corr(z, zi)}
    if labels is not None:
        out[p + "ind_probe_accuracy"] = M.linear_probe_accuracy(zi, labels, seed=seed)
        out[p + "shared_probe_accuracy"] = M.linear_probe_accuracy(z, labels, seed=seed)
    return out


def structure_diagnostics(img, txt, labels=None, img_aug=None, img_ind=None, txt_ind=None,
                          t: float = BRIDGE_T, seed: int = 0) -> dict:
    """Every diagnostic the given embeddings allow: ``gc_*`` always, ``bridge_distance`` /
    ``aug_view_distance`` with ``img_aug``, ``sep_*`` with the independent features."""
    out = gc_discrepancies(img, txt)
    if img_aug is not None:
        out.update(bridge_distances(img, txt, img_aug, t=t))
    if img_ind is not None:
        out.update(separation_measures(img, img_ind, labels, "image", seed=seed))
    if txt_ind is not None:
        out.update(separation_measures(txt, txt_ind, labels, "text", seed=seed))
    return out


def load_heads(model, checkpoint) -> Optional[object]:
    """The separation heads of a training checkpoint (their file beside it, or
    ``checkpoint["structure_heads"]`` in earlier versions), attached to ``model`` and loaded
    strictly; None when the checkpoint has none (or is not a training-checkpoint file, e.g. an
    exported ``local-dir:`` model)."""
    import os

    import torch

    from ..views.heads import attach_heads, saved_heads

    if not checkpoint or not os.path.isfile(str(checkpoint)):
        return None
    saved, _ = saved_heads(checkpoint, torch.load(str(checkpoint), map_location="cpu", weights_only=True, mmap=True))
    if not saved:
        return None
    heads = attach_heads(model)
    heads.load_state_dict(saved, strict=True)
    heads.to(next(model.parameters()).device).eval()
    return heads


def encode_structure_views(model, preprocess, tokenizer, pattern, heads=None, view_aug: str = "crop",
                           batch_size: int = 256, max_samples: Optional[int] = None, seed: int = 0,
                           json_keys=None) -> dict:
    """Encode the shards' pairs for the diagnostics: ``{"img_aug"[, "img_ind", "txt_ind"]}`` as
    float32 arrays in shard order (a multi-caption sample's text: its first caption; with
    ``json_keys`` the captions are those ``.json`` fields). ``img_aug``: the augmented view of each
    image (the training view transform of :func:`openclip_structure.views.image.augmented_view_transform`
    on the model's validation preprocessing, seeded by ``seed``); ``*_ind``: the independent
    features of ``heads`` (from the same pooled outputs as the shared projection)."""
    import torch

    from .encoding import sample_captions
    from ..data.reader import _decode_image, iter_shard_samples
    from ..views.image import augmented_view_transform
    from ..views.towers import encode_pooled

    size = getattr(model.visual, "image_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    aug = augmented_view_transform(preprocess, view_aug, image_size=size)
    dev = next(model.parameters()).device
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out = {"img_aug": []}
    if heads is not None:
        out.update(img_ind=[], txt_ind=[])
    batch: list = []

    def flush():
        if not batch:
            return
        images = [_decode_image(k, b) for k, b, _, _ in batch]
        xa = torch.stack([aug(im) for im in images]).to(dev)
        out["img_aug"].append(model.encode_image(xa, normalize=True).float().cpu().numpy())
        if heads is not None:
            x = torch.stack([preprocess(im) for im in images]).to(dev)
            _, pooled = encode_pooled(model, x, "image")
            out["img_ind"].append(heads["image"](pooled).float().cpu().numpy())
            _, pooled = encode_pooled(model, tokenizer([sample_captions(c)[0] for _, _, c, _ in batch]).to(dev), "text")
            out["txt_ind"].append(heads["text"](pooled).float().cpu().numpy())
        batch.clear()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n = 0
            for sample in iter_shard_samples(pattern, json_keys=json_keys):
                if max_samples is not None and n >= max_samples:
                    break
                batch.append(sample)
                n += 1
                if len(batch) == batch_size:
                    flush()
            flush()
    finally:
        model.train(was_training)
        torch.random.set_rng_state(gen_state)
    return {k: np.concatenate(v) for k, v in out.items() if v}
