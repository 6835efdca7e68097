"""What a regularizer weight means on N processes: the gradient scale of open_clip's base loss.

Every regularizer of this package is exact under data parallelism: the gradient DDP/FSDP applies
for a term is the single-process gradient of that term on the global batch (see
:mod:`openclip_structure.losses.runtime`). open_clip's base losses are not all like that. With the
DEFAULT flags (no ``--local-loss``, no ``--gather-with-grad``) ``ClipLoss`` gathers the other
processes' features without gradient, so each process back-propagates the global loss through its
own rows only; DDP then averages, and the applied gradient is ``1/W`` times the single-process
gradient for every parameter that produces the embeddings (the towers), while the logit scale,
which every process uses on the whole global logit matrix, gets its single-process gradient. Left
alone, every regularizer would be ``W`` times stronger relative to the contrastive loss on ``W``
GPUs than on one (``--gc-weight 0.25`` on 8 GPUs would act like 2).

:func:`base_gradient_scale` tells, from the base loss object and the world size, the factor ``c``
with ``applied gradient of the base = c x single-process gradient`` for the embeddings (and the
factor for the logit scale, 1 for every open_clip loss). The composite loss scales the gradient of
the terms' inputs by the same factors (values, and so the logged losses, are untouched), so the
optimizer applies ``c x grad(base + sum_k w_k term_k)`` of the single-process objective on any
number of processes, parameter by parameter: a weight means the same on 1 or 64 GPUs (and AdamW,
invariant to a constant gradient scale per parameter, takes the same steps). Derivations (``W``
processes, equal local batches, DDP/FSDP gradient averaging), ``c`` for the embeddings:

==============================================  =========  =============================================
base loss and flags                             ``c``      why
==============================================  =========  =============================================
any, one process                                1          nothing to average
ClipLoss / DistillClipLoss, ``--gather-with-grad``  1      gathered rows carry gradients; the all-gather's
(with or without ``--local-loss``)                         backward sums them over processes
ClipLoss / DistillClipLoss, default flags       ``1/W``    each process differentiates the global loss
                                                           through its own rows only, DDP divides by W
ClipLoss, ``--local-loss`` only                 1 (*)      each process keeps only the row part of its
                                                           local rows' gradient: not a scaled gradient
SigLipLoss, every ``--loss-dist-impl``          1          features are exchanged with gradients
CoCaLoss                                        as ClipLoss (*) the caption loss is a local mean (``c = 1``);
                                                           with default flags its contrastive part has 1/W
an unknown base loss                            1 (*)      cannot be told
==============================================  =========  =============================================

(*) the base gradient is not one scaled single-process gradient: :attr:`GradientScale.exact` is
False and the launcher says so once at startup, naming the flags to use instead
(``--local-loss --gather-with-grad``, exact with ``c = 1`` and the memory-efficient choice at scale).
"""
from __future__ import annotations

from dataclasses import dataclass

EXACT_FLAGS = "--local-loss --gather-with-grad"


@dataclass(frozen=True)
class GradientScale:
    """``factor``: the ``c`` above (gradient of the embeddings); ``logit_scale``: the same for the
    logit scale; ``exact``: whether the base's applied gradient is these factors times its
    single-process gradient; ``reason``: one sentence for the startup log."""

    factor: float
    exact: bool
    reason: str
    logit_scale: float = 1.0


def _loss_classes():
    from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

    return ClipLoss, CoCaLoss, SigLipLoss


def base_gradient_scale(base, world_size: int) -> GradientScale:
    """The gradient scale ``c`` of open_clip's base loss ``base`` on ``world_size`` processes."""
    world_size = int(world_size)
    name = type(base).__name__
    if world_size <= 1:
        return GradientScale(1.0, True, "one process")
    ClipLoss, CoCaLoss, SigLipLoss = _loss_classes()
    if isinstance(base, SigLipLoss):
        impl = getattr(base, "dist_impl", None) or "bidir"
        return GradientScale(1.0, True, f"{name} (--loss-dist-impl {impl}) exchanges features with "
                                        f"gradients: its applied gradient is the single-process gradient")
    if not isinstance(base, ClipLoss):
        return GradientScale(1.0, False, f"the base loss {name} is not one of open_clip's ClipLoss/SigLipLoss/"
                                         f"CoCaLoss/DistillClipLoss, so how its gradient scales with the "
                                         f"number of processes is unknown; the regularizers keep their "
                                         f"single-process gradient scale")
    local, with_grad = bool(base.local_loss), bool(base.gather_with_grad)
    caption = isinstance(base, CoCaLoss) and bool(getattr(base, "caption_loss_weight", 0)) \
        and bool(getattr(base, "clip_loss_weight", 0))
    if with_grad:
        factor, exact = 1.0, True
        reason = (f"{name} with --gather-with-grad: the gathered features carry gradients, so its applied "
                  f"gradient is the single-process gradient")
    elif not local:
        factor, exact = 1.0 / world_size, not caption
        reason = (f"{name} with the default flags (no --local-loss, no --gather-with-grad) back-propagates "
                  f"the global loss through each process's own rows only and DDP averages over "
                  f"{world_size} processes: its applied gradient is 1/{world_size} of the single-process "
                  f"gradient (the logit scale's is not scaled), so the regularizers' gradients into the "
                  f"embeddings are scaled by 1/{world_size} too (their logged values are not)")
        if caption:
            reason += ("; CoCa's caption loss is a per-process mean whose applied gradient is NOT scaled, so "
                       "the contrastive and caption parts are weighted differently than on one process")
    else:
        factor, exact = 1.0, False
        reason = (f"{name} with --local-loss but without --gather-with-grad keeps only each process's own "
                  f"rows of the logits and no gradient through the other processes' features: its "
                  f"applied gradient is not a scaled single-process gradient; the regularizers keep the "
                  f"scale of the part it keeps (1)")
    if not exact:
        reason += f". For a weight that means the same on any number of processes use {EXACT_FLAGS}"
    return GradientScale(factor, exact, reason)
