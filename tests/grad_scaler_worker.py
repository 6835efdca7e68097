"""Worker for tests/test_fsdp_grad_scaler.py, run under `torchrun --standalone --nproc_per_node 2`
(gloo, CPU).

argv[1] is a JSON job {"dir": path}. A small MLP is sharded with FSDP2 (``fully_shard`` per
layer, then the root: every gradient is a ``Shard(0)`` DTensor) and trained with torch's own
``torch.amp.GradScaler("cpu")`` under fp16 autocast, each rank on its half of a fixed global
batch; a reference copy of the same MLP (not sharded) is trained on every rank on the whole
batch with its own ``torch.amp.GradScaler``. Then an inf is written into rank 1's LOCAL
gradient shard only, and the scaler steps. Writes <dir>/rank<r>.json.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

STEPS, GLOBAL_BATCH, INIT_SCALE = 3, 8, 2.0 ** 10


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def step(model, optimizer, scaler, x, y, corrupt=None):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    if corrupt is not None:
        corrupt(model)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e3)
    scaler.step(optimizer)
    scaler.update()
    loss = loss.detach()
    if isinstance(grad_norm, DTensor):  # the sharded model: the loss of the whole batch, the norm of all shards
        dist.all_reduce(loss)  # (gloo has no AVG)
        loss = loss / dist.get_world_size()
        grad_norm = grad_norm.full_tensor()
    return float(loss), float(grad_norm)


def full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def main():
    from torch.distributed.fsdp import fully_shard

    job = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g))
            for _ in range(STEPS)]
    b = GLOBAL_BATCH // world

    ref = mlp()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    sharded = mlp()
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    res = {"sharded": all(isinstance(p, DTensor) for p in sharded.parameters()), "steps": []}

    for x, y in data[:2]:
        r = step(ref, ref_opt, ref_scaler, x, y)
        s = step(sharded, opt, scaler, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b])
        res["steps"].append({"ref": r, "fsdp": s})
    res["grads_dtensor"] = all(isinstance(p.grad, DTensor) for p in sharded.parameters())
    res["param_max_diff"] = max(float((full(p) - q.detach()).abs().max())
                                for p, q in zip(sharded.parameters(), ref.parameters()))
    res["scale_after_finite_steps"] = [ref_scaler.get_scale(), scaler.get_scale()]

    # an overflow in rank 1's local shard only
    local_inf = []

    def corrupt(model):
        w = model[0].weight.grad
        if rank == 1:
            w.to_local().view(-1)[0] = float("inf")
        local_inf.append(not all(bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters()))

    before = [full(p) for p in sharded.parameters()]
    scale_before = scaler.get_scale()
    x, y = data[2]
    step(sharded, opt, scaler, x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b], corrupt=corrupt)
    res["local_shard_has_inf"] = local_inf[0]
    res["params_unchanged"] = all(torch.equal(a, full(p)) for a, p in zip(before, sharded.parameters()))
    res["scales"] = [scale_before, scaler.get_scale()]
    with open(os.path.join(job["dir"], f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()  # no rank tears gloo down while the other still has work in flight (as the other workers)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
