"""Worker for tests/test_structure_losses.py, run under `torchrun --nproc_per_node N` (gloo, CPU).

Builds the latent-structure terms directly (no flags). A tiny two-tower model with independent
heads maps fixed inputs (and fixed "augmented" inputs) to unit embeddings; each process takes its
slice of the global batch, computes every term's statistics from ONE shared ``FeatureBatch`` (one
gather per key), reduces all statistics in ONE ``reduce_statistics`` call, finalizes, and records
each term's value and the process-averaged gradient (what DDP applies). With world size 1 the same
code gives the single-process reference on the global batch.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from openclip_structure.losses.runtime import FeatureBatch, reduce_statistics
from openclip_structure.losses import (AugmentedGeometricConsistency, BrownianBridge, GeometricConsistency,
                                       IndependentHead, InModalContrastive, SeparationInModalContrast,
                                       SeparationOrthogonality, SeparationUniformity)

GLOBAL_BATCH, IN_DIM, EMBED_DIM = 12, 6, 5


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Parameter(torch.randn(IN_DIM, EMBED_DIM, generator=g, dtype=torch.float64))
        self.text = nn.Parameter(torch.randn(IN_DIM, EMBED_DIM, generator=g, dtype=torch.float64))
        self.image_head = IndependentHead(IN_DIM, EMBED_DIM, dtype=torch.float64)
        self.text_head = IndependentHead(IN_DIM, EMBED_DIM, dtype=torch.float64)
        with torch.no_grad():  # same weights on every process, independent of the global RNG
            self.image_head.proj.copy_(torch.randn(IN_DIM, EMBED_DIM, generator=g, dtype=torch.float64))
            self.text_head.proj.copy_(torch.randn(IN_DIM, EMBED_DIM, generator=g, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x_img, x_txt, x_img_aug, x_txt_aug):
        return dict(image=F.normalize(x_img @ self.image, dim=-1),
                    text=F.normalize(x_txt @ self.text, dim=-1),
                    image_aug=F.normalize(x_img_aug @ self.image, dim=-1),
                    text_aug=F.normalize(x_txt_aug @ self.text, dim=-1),
                    image_ind=self.image_head(x_img), text_ind=self.text_head(x_txt),
                    image_aug_ind=self.image_head(x_img_aug), text_aug_ind=self.text_head(x_txt_aug))


def global_inputs():
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH
    x_img = torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    x_txt = x_img + 0.3 * torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    x_img_aug = x_img + 0.2 * torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    x_txt_aug = x_txt + 0.2 * torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    return x_img, x_txt, x_img_aug, x_txt_aug


def make_terms():
    """label -> (term, uses the batch without text augmentation)."""
    return {
        "gc": (GeometricConsistency(), False),
        "gc_aug": (AugmentedGeometricConsistency(), False),
        "gc_aug(text_aug=text)": (AugmentedGeometricConsistency(), True),
        "bridge(t=0.25)": (BrownianBridge(), False),
        "bridge(t=uniform)": (BrownianBridge(t="uniform", seed=1234), False),
        "sep_ortho": (SeparationOrthogonality(), False),
        "sep_icon": (SeparationInModalContrast(temperature=0.1), False),
        "sep_iuni": (SeparationUniformity(), False),
        "inmodal": (InModalContrastive(), False),
    }


def averaged(grads, world_size):
    if world_size > 1:
        for g in grads:
            dist.all_reduce(g)
            g /= world_size
    return grads


def run():
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    b = GLOBAL_BATCH // world_size
    inputs = [x[rank * b:(rank + 1) * b] for x in global_inputs()]
    model = Towers()
    feats = model(*inputs)
    scale = model.logit_scale.exp()
    batch = FeatureBatch(feats, rank, world_size, logit_scale=scale)
    no_text_aug = FeatureBatch({**feats, "text_aug": feats["text"]}, rank, world_size, logit_scale=scale)

    terms = make_terms()
    stats = [term.statistics(no_text_aug if plain else batch) for term, plain in terms.values()]
    stats = reduce_statistics(stats, world_size)  # one all-reduce for every term
    params = list(model.parameters())
    result = {}
    for (label, (term, _)), s in zip(terms.items(), stats):
        value = term.finalize(s)
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        result[label] = {"value": value.item(),
                         "grad": [g.flatten().tolist() for g in averaged(grads, world_size)]}
    return result


if __name__ == "__main__":
    # argv[1]: output JSON path (written by rank 0)
    dist.init_process_group("gloo")
    res = run()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    # torch's gloo backend intermittently aborts at interpreter exit AFTER a clean
    # destroy_process_group ("terminate called without an active exception", C++ teardown of a
    # joinable thread); the work is done and written, so leave without running C++ destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
