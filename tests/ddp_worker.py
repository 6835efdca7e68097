"""Worker for tests/test_distributed.py, run under `torchrun --nproc_per_node N` (gloo, CPU).

A tiny two-tower model (with independent heads, a caption head for CoCa and a fixed teacher for
distillation) maps fixed inputs to unit embeddings; each process takes its slice of the global
batch. For one configuration (plugin flags, open_clip base loss, --local-loss/--gather-with-grad)
it builds the loss with the plugin's ``create_loss`` on top of open_clip's own ``create_loss`` and
records, for every loss key, the value and the process-averaged gradient (what DDP applies); then
it trains a few AdamW steps (eps 1e-12: invariant to a common gradient scale) through the plugin's
CPU-capable DDP and records the loss trajectory and final parameters. With world size 1 the same
code gives the single-process reference on the global batch.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from openclip_structure import flags
from openclip_structure.integration.parallel import CPUFriendlyDDP
from openclip_structure.factory import create_loss
from openclip_structure.losses import IndependentHead

import helpers  # tests/ (this script's folder) is on sys.path

GLOBAL_BATCH, IN_DIM, EMBED_DIM, CAPTION_LEN, VOCAB = 16, 6, 8, 3, 5
BASE_KEYS = ("contrastive_loss", "caption_loss", "distill_loss")


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class Towers(nn.Module):
    """Linear towers; ``forward`` returns open_clip's model-output keys for the base loss plus the
    second views and independent features the plugin's view terms read."""

    def __init__(self, base: str, heads: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # same weights on every process, independent of the global RNG
        self.base = base
        self.image = nn.Parameter(_randn(g, IN_DIM, EMBED_DIM))
        self.text = nn.Parameter(_randn(g, IN_DIM, EMBED_DIM))
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        head_weights = [_randn(g, IN_DIM, EMBED_DIM) for _ in range(2)]
        caption, self.teacher = _randn(g, IN_DIM, CAPTION_LEN * VOCAB), _randn(g, IN_DIM, EMBED_DIM)
        # only parameters the step uses (DDP refuses unused ones)
        self.heads = None
        if heads:
            self.heads = nn.ModuleList([IndependentHead(IN_DIM, EMBED_DIM, dtype=torch.float64) for _ in range(2)])
            with torch.no_grad():
                for head, w in zip(self.heads, head_weights):
                    head.proj.copy_(w)
        if base == "coca":
            self.caption = nn.Parameter(caption)
        if base.startswith("siglip"):
            self.logit_bias = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

    def forward(self, x_img, x_txt, x_img_aug, x_txt_aug, labels):
        def unit(x, w):
            return F.normalize(x @ w, dim=-1)

        out = dict(image_features=unit(x_img, self.image), text_features=unit(x_txt, self.text),
                   logit_scale=self.logit_scale.exp(),
                   image_aug_features=unit(x_img_aug, self.image), text_aug_features=unit(x_txt_aug, self.text))
        if self.heads is not None:
            out.update(image_ind_features=self.heads[0](x_img), text_ind_features=self.heads[1](x_txt),
                       image_aug_ind_features=self.heads[0](x_img_aug),
                       text_aug_ind_features=self.heads[1](x_txt_aug))
        if self.base == "coca":
            out["logits"] = (x_txt @ self.caption).view(-1, CAPTION_LEN, VOCAB)
            out["labels"] = labels
        elif self.base.startswith("siglip"):
            out["logit_bias"] = self.logit_bias
        elif self.base == "distill":
            out.update(dist_image_features=unit(x_img, self.teacher), dist_text_features=unit(x_txt, self.teacher),
                       dist_logit_scale=torch.tensor(3.0, dtype=torch.float64))
        return out


def global_inputs():
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH
    x_img = _randn(g, n, IN_DIM)
    x_txt = x_img + 0.3 * _randn(g, n, IN_DIM)
    x_img_aug = x_img + 0.2 * _randn(g, n, IN_DIM)
    x_txt_aug = x_txt + 0.2 * _randn(g, n, IN_DIM)
    labels = torch.randint(1, VOCAB, (n, CAPTION_LEN), generator=g)  # no padding (id 0) anywhere
    return x_img, x_txt, x_img_aug, x_txt_aug, labels


#: open_clip flags of each base loss (the worker's fixed teacher stands in for the distill model)
BASE_FLAGS = {"clip": [], "coca": ["--model", "coca-tiny"],
              "distill": ["--distill-model", "ViT-B-32", "--distill-pretrained", "openai"]}


def make_args(plugin_flags, rank, world_size, local_loss, gather_with_grad, base="clip"):
    """open_clip_train's parsed args (tests/helpers.py) for this base loss and process."""
    if base.startswith("siglip"):
        base_flags = ["--siglip", "--loss-dist-impl", base.split(":")[1]]
    else:
        base_flags = BASE_FLAGS[base]
    argv = (base_flags + (["--local-loss"] if local_loss else []) + (["--gather-with-grad"] if gather_with_grad else [])
            + list(plugin_flags))
    return helpers.make_args(argv, rank=rank, world_size=world_size)


def averaged(grads, world_size):
    if world_size > 1:
        for g in grads:
            dist.all_reduce(g)
            g /= world_size
    return grads


def run(plugin_flags, local_loss, gather_with_grad, base="clip", steps=3):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    b = GLOBAL_BATCH // world_size
    inputs = [x[rank * b:(rank + 1) * b] for x in global_inputs()]
    args = make_args(plugin_flags, rank, world_size, local_loss, gather_with_grad, base)
    loss = create_loss(args)
    model = Towers(base, heads=flags.separation_enabled(args))
    result = {"terms": {}, "grad_scale": float(getattr(loss, "grad_scale", 1.0)),
              "param_names": [n for n, _ in model.named_parameters()]}

    out = loss(**model(*inputs), output_dict=True)
    params = list(model.parameters())
    for key, value in out.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        result["terms"][key] = {"value": value.item(),
                                "grad": [g.flatten().tolist() for g in averaged(grads, world_size)]}

    ddp = CPUFriendlyDDP(model, device_ids=[torch.device("cpu")]) if world_size > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, eps=1e-12, weight_decay=0.1)
    result["trajectory"] = []
    for _ in range(steps):
        opt.zero_grad()
        out = loss(**ddp(*inputs), output_dict=True)
        sum(out.values()).backward()
        opt.step()
        result["trajectory"].append({k: v.item() for k, v in out.items()})
    result["params"] = [p.detach().flatten().tolist() for p in model.parameters()]
    return result


if __name__ == "__main__":
    # argv[1]: JSON {"out": path, "configs": [{"flags": [...], "local_loss": b, "gather_with_grad": b,
    #                                          "base": "clip"|"siglip:<impl>"|"coca"|"distill"}]}
    job = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    results = [run(c["flags"], c["local_loss"], c["gather_with_grad"], c.get("base", "clip"))
               for c in job["configs"]]
    if dist.get_rank() == 0:
        with open(job["out"], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    # torch's gloo backend sometimes aborts at interpreter exit ("terminate called without an
    # active exception") after a clean shutdown; the results are written, so leave directly.
    os._exit(0)
