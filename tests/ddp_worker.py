"""Worker for tests/test_distributed.py, run under `torchrun --nproc_per_node N` (gloo, CPU).

A tiny two-tower model maps fixed inputs to unit embeddings; each process takes its slice of the
global batch. It records, for every loss term, the value and the process-averaged gradient
(what DDP applies), then runs optimizer steps through the plugin's CPU-capable DDP and records
the loss trajectory and final parameters. With world size 1 the same code gives the reference.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from openclip_structure import flags
from openclip_structure.distributed import CPUFriendlyDDP
from openclip_structure.factory import create_loss

GLOBAL_BATCH, IN_DIM, EMBED_DIM = 16, 6, 8


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image = nn.Parameter(torch.randn(IN_DIM, EMBED_DIM, generator=g, dtype=torch.float64))
        self.text = nn.Parameter(torch.randn(IN_DIM, EMBED_DIM, generator=g, dtype=torch.float64))
        self.logit_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x_img, x_txt):
        return dict(image_features=F.normalize(x_img @ self.image, dim=-1),
                    text_features=F.normalize(x_txt @ self.text, dim=-1),
                    logit_scale=self.logit_scale.exp())


def global_inputs():
    g = torch.Generator().manual_seed(1)
    n = GLOBAL_BATCH
    x_img = torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    x_txt = x_img + 0.3 * torch.randn(n, IN_DIM, generator=g, dtype=torch.float64)
    return x_img, x_txt


def make_args(plugin_flags, rank, world_size, local_loss, gather_with_grad):
    parser = flags.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(plugin_flags)
    for k, v in dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=False,
                     rank=rank, world_size=world_size, horovod=False, distill=False, siglip=False,
                     model="structure-tiny", loss_dist_impl=None).items():
        setattr(args, k, v)
    flags.validate(args)
    return args


def averaged(grads, world_size):
    if world_size > 1:
        for g in grads:
            dist.all_reduce(g)
            g /= world_size
    return grads


def run(plugin_flags, local_loss, gather_with_grad, steps=2):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    b = GLOBAL_BATCH // world_size
    x_img, x_txt = global_inputs()
    x_img, x_txt = x_img[rank * b:(rank + 1) * b], x_txt[rank * b:(rank + 1) * b]
    loss = create_loss(make_args(plugin_flags, rank, world_size, local_loss, gather_with_grad))
    model = Towers()
    result = {"terms": {}}

    out = loss(**model(x_img, x_txt), output_dict=True)
    params = list(model.parameters())
    for key, value in out.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        result["terms"][key] = {"value": value.item(),
                                "grad": [g.flatten().tolist() for g in averaged(grads, world_size)]}

    ddp = CPUFriendlyDDP(model, device_ids=[torch.device("cpu")]) if world_size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    result["trajectory"] = []
    for _ in range(steps):
        opt.zero_grad()
        out = loss(**ddp(x_img, x_txt), output_dict=True)
        sum(out.values()).backward()
        opt.step()
        result["trajectory"].append({k: v.item() for k, v in out.items()})
    result["params"] = [p.detach().flatten().tolist() for p in model.parameters()]
    return result


if __name__ == "__main__":
    # argv[1]: JSON {"out": path, "configs": [{"flags": [...], "local_loss": b, "gather_with_grad": b}]}
    job = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    results = [run(c["flags"], c["local_loss"], c["gather_with_grad"]) for c in job["configs"]]
    if dist.get_rank() == 0:
        with open(job["out"], "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    # torch's gloo backend sometimes aborts at interpreter exit ("terminate called without an
    # active exception") after a clean shutdown; the results are written, so leave directly.
    os._exit(0)
