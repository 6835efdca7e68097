"""Brownian bridge (Jiang et al., "Understanding and Constructing Latent Modality Structures in
Multi-modal Representation Learning", CVPR 2023, arXiv 2303.05952, section "Brownian bridge"), inter-modality
regularization: the augmented image embedding should lie on the bridge between the image and its
caption::

    mu_j = normalize( t * zV_j + (1 - t) * zT_j )
    L_br = (1/N) sum_j || zaV_j - mu_j ||^2          (= 2 - 2 <zaV_j, mu_j> on the sphere)

This is the FIRST line of the paper's equation. The paper's "simplified" second line is
algebraically wrong (it drops the "2 - 2" and a square root; minimising it pushes zaV away from
the bridge) and is deliberately not implemented. The Gaussian variance t(1-t) is constant for a
fixed t and drops out. A per-sample loss: no gather is needed.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .runtime import FeatureBatch
from .base import RegularizerTerm, row_count
from .geometric import _check_paired


def _check_bridge_t(t: Union[float, str]) -> Union[float, str]:
    if isinstance(t, str):
        if t != "uniform":
            raise ValueError(f"bridge: t must be a number in [0, 1] or 'uniform', got {t!r}")
        return t
    if isinstance(t, bool):
        raise ValueError(f"bridge: t must be a number in [0, 1] or 'uniform', got {t!r}")
    try:
        value = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"bridge: t must be a number in [0, 1] or 'uniform', got {t!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"bridge: t must be in [0, 1] (image weight of the bridge point), got {value}")
    return value


class BrownianBridge(RegularizerTerm):
    """L_br of Jiang et al. (CVPR 2023, arXiv 2303.05952, section "Brownian bridge"): mean squared
    distance of the augmented image embedding to the re-normalised bridge point
    ``normalize(t zV + (1-t) zT)`` (the paper's first line, not its misprinted simplification).

    Keys: ``image``, ``text``, ``image_aug``.

    ``t``: the image weight, 0.25 as in all the paper's experiments, any number in [0, 1], or
    ``"uniform"``: one t ~ U(0, 1) per sample and call. Uniform draws use ``generator`` (a
    ``torch.Generator``; or give ``seed`` to make one; neither: torch's global RNG) and are drawn in
    float64 on the generator's device, so they do not depend on the feature dtype. Every call draws
    ``N_global`` values and each process uses the slice of its own rows: under data parallelism
    each process draws for its own rows, and with the same seed on every process the draws (hence
    value and gradients) equal those of one process on the global batch; with rank-dependent
    seeds (open_clip seeds torch by rank) the draws are still i.i.d. U(0, 1). The generator state
    is not checkpointed (a resumed run draws a fresh stream).
    Statistics: [sum of squared distances, local rows].
    """

    name = "bridge"
    keys = ("image", "text", "image_aug")

    def __init__(self, t: Union[float, str] = 0.25, generator: Optional[torch.Generator] = None,
                 seed: Optional[int] = None):
        super().__init__()
        self.t = _check_bridge_t(t)
        if generator is not None and seed is not None:
            raise ValueError("bridge: give either a generator or a seed, not both")
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"bridge: generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator

    def _weights(self, batch: FeatureBatch, like: torch.Tensor) -> Union[float, torch.Tensor]:
        if self.t != "uniform":
            return self.t
        device = self.generator.device if self.generator is not None else like.device
        u = torch.rand(batch.n_global, generator=self.generator, dtype=torch.float64, device=device)
        return u[batch.offset:batch.offset + batch.n_local].to(device=like.device, dtype=like.dtype).unsqueeze(1)

    def statistics(self, batch: FeatureBatch) -> torch.Tensor:
        rows = {k: batch.rows(k) for k in self.keys}
        _check_paired("brownian bridge (bridge)", rows)
        zv, zt, zva = rows["image"], rows["text"], rows["image_aug"]
        t = self._weights(batch, zv)
        mu = F.normalize(t * zv + (1 - t) * zt, dim=-1)
        sq = ((zva - mu) ** 2).sum()
        return torch.stack([sq, row_count(batch, sq)])

    def finalize(self, stats: torch.Tensor) -> torch.Tensor:
        return stats[0] / stats[1]


def brownian_bridge(img: torch.Tensor, txt: torch.Tensor, img_aug: torch.Tensor,
                    t: Union[float, str] = 0.25, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """L_br (Jiang et al. 2023) of unit-norm ``[N, D]`` image, text and augmented-image embeddings;
    ``t`` a number in [0, 1] or ``"uniform"`` (per-sample U(0, 1) from ``generator``)."""
    feats = {"image": img, "text": txt, "image_aug": img_aug}
    _check_paired("brownian bridge (bridge)", feats)
    return BrownianBridge(t=t, generator=generator)(feats)
