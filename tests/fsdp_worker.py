"""Worker for tests/test_fsdp.py, run under `torchrun --standalone --nproc_per_node 2` (gloo, CPU).

argv[1] is a JSON job {"phase": "train" | "resume", "dir": path}. Every rank builds
open_clip's ``structure-tiny`` with the same seed, takes its slice of a fixed global batch per
step and trains with the plugin's loss (gap terms on, --local-loss --gather-with-grad), like
open_clip_train's train_one_epoch (AdamW with open_clip's parameter groups, gradient clipping,
logit-scale clamp), once with the plugin's CPU-capable DDP and once with ``fsdp.wrap``.

phase "train" (writes <dir>/train.json, <dir>/ckpt.pt, <dir>/sharded/, <dir>/ddp_state.pt):
  3 steps DDP and FSDP; gather_full_state + rank-0 torch.save exactly as open_clip saves; an
  eval replica on rank 0; save_sharded; 2 more steps of each (the references for resuming);
  staleness; grad checkpointing; torch's GradScaler under FSDP; separation heads + two views.
phase "resume" (writes <dir>/resume.json): fresh models (another seed) resumed from ckpt.pt
  (FSDP through container/optimizer load_state_dict, DDP through open_clip's plain calls) and
  from the sharded directory, 2 steps each.
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist

import open_clip
from openclip_structure import fsdp
from openclip_structure.integration.parallel import CPUFriendlyDDP
from openclip_structure.factory import create_loss
from openclip_structure.configs import register_model_configs

import helpers  # tests/ (this script's folder) is on sys.path

GLOBAL_BATCH, STEPS, EXTRA = 8, 3, 2
CLIP_NORM = 0.5


def make_args(plugin_flags, rank, world_size):
    """open_clip_train's parsed args (tests/helpers.py): --local-loss --gather-with-grad + ``plugin_flags``."""
    return helpers.make_args(["--local-loss", "--gather-with-grad"] + list(plugin_flags), rank=rank,
                             world_size=world_size)


GAP = ["--gap-atp-weight", "1", "--gap-cu-weight", "1"]
SEP = ["--sep-weight", "1", "--gc-aug-weight", "1", "--gap-atp-weight", "1"]


def batches(n_steps, two_views=False, seed=1):
    """Per step: this rank's slice of a fixed global batch (images 3x32x32, token ids)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    b = GLOBAL_BATCH // world
    out = []
    for _ in range(n_steps):
        shape = (GLOBAL_BATCH, 2, 3, 32, 32) if two_views else (GLOBAL_BATCH, 3, 32, 32)
        images = torch.randn(*shape, generator=g)
        texts = torch.randint(1, 49407, (GLOBAL_BATCH, 16), generator=g)
        out.append((images[rank * b:(rank + 1) * b], texts[rank * b:(rank + 1) * b]))
    return out


def build(seed=0, heads=False, grad_checkpointing=False):
    from openclip_structure.views import heads as heads_mod
    from openclip_structure.integration.forward import install_forward

    torch.manual_seed(seed)
    model = open_clip.create_model("structure-tiny", output_dict=True)
    if heads:
        heads_mod.attach_heads(model, "structure-tiny")
        install_forward(model)
    if grad_checkpointing:
        model.set_grad_checkpointing()
    return model


def make_optimizer(model, lr=1e-3, wd=0.1):
    """open_clip_train.main's AdamW, built from the WRAPPED model's named_parameters()."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    gain = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    return torch.optim.AdamW([{"params": gain, "weight_decay": 0.0}, {"params": rest, "weight_decay": wd}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def as_float(t):
    if fsdp.is_dtensor(t):
        t = t.full_tensor()
    return float(t)


def train_step(model, optimizer, loss_fn, images, texts, scaler=None):
    """open_clip_train.train.train_one_epoch's step with accum_freq 1 and --grad-clip-norm."""
    optimizer.zero_grad()
    out = model(images, texts)
    losses = loss_fn(**out, output_dict=True)
    total = sum(losses.values())
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM, norm_type=2.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM, norm_type=2.0)
        optimizer.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, math.log(100))
    rec = {k: v.item() for k, v in losses.items()}
    rec["grad_norm"] = as_float(norm)
    rec["logit_scale_shape"] = list(out["logit_scale"].shape)
    return rec


def gather_records(rec):
    """Every rank's record (local losses differ per rank with --local-loss)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rec)
    return out


def run_steps(model, optimizer, loss_fn, data, scaler=None):
    return [gather_records(train_step(model, optimizer, loss_fn, x, t, scaler)) for x, t in data]


def ddp(model):
    return CPUFriendlyDDP(model, device_ids=[torch.device("cpu")])


def full_params(model):
    """{name: full tensor} of the underlying model (DTensors gathered; all ranks call)."""
    inner = unwrap(model)
    return {n: (p.full_tensor() if fsdp.is_dtensor(p) else p.detach()).reshape(-1).clone()
            for n, p in inner.named_parameters()}


def max_abs_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def phase_train(job, rank, world):
    d = job["dir"]
    res = {}
    loss_fn = create_loss(make_args(GAP, rank, world))
    data = batches(STEPS + EXTRA)

    # (a) DDP
    m_ddp = ddp(build())
    o_ddp = make_optimizer(m_ddp)
    res["ddp"] = run_steps(m_ddp, o_ddp, loss_fn, data[:STEPS])

    # (b) FSDP, optimizer bound after construction as the launcher's optimizer hook does
    m_fsdp = fsdp.wrap(build(), make_args(GAP, rank, world))
    o_fsdp = fsdp.bind_optimizer(m_fsdp, make_optimizer(m_fsdp))
    res["fsdp_container_type"] = type(m_fsdp).__name__
    res["n_groups"] = [len(g["params"]) for g in o_fsdp.param_groups]
    res["n_groups_ddp"] = [len(g["params"]) for g in o_ddp.param_groups]
    res["fsdp"] = run_steps(m_fsdp, o_fsdp, loss_fn, data[:STEPS])
    res["sharded_param_bytes"] = sum(fsdp.local_tensor(p).numel() * p.element_size() for p in m_fsdp.parameters())
    res["full_param_bytes"] = sum(p.numel() * p.element_size() for p in m_ddp.parameters())
    res["params_after_3_max_diff"] = max_abs_diff(full_params(m_fsdp), full_params(m_ddp))

    # stale before any gather: rank 0 alone must get a clear error, not a hang
    if rank == 0:
        try:
            m_fsdp.state_dict()
            res["stale_before_gather"] = "no error"
        except fsdp.StaleStateError:
            res["stale_before_gather"] = "StaleStateError"

    # full checkpoint, exactly as open_clip_train saves it (rank 0 only)
    fsdp.gather_full_state(m_fsdp, o_fsdp)
    with torch.no_grad():  # a forward without backward leaves the root unsharded: the stash stays valid
        m_fsdp(*data[0])
    res["has_full_state"] = fsdp.has_full_state(m_fsdp)
    if rank == 0:
        checkpoint = {"epoch": 1, "name": "fsdp-test", "state_dict": m_fsdp.state_dict(),
                      "optimizer": o_fsdp.state_dict()}
        torch.save(checkpoint, os.path.join(d, "ckpt.pt"))
        torch.save({k: v.detach().clone() for k, v in m_ddp.module.state_dict().items()},
                   os.path.join(d, "ddp_state.pt"))
        torch.save(o_ddp.state_dict(), os.path.join(d, "ddp_optimizer.pt"))
        sd = checkpoint["state_dict"]
        res["ckpt_keys_prefixed"] = all(k.startswith("module.") for k in sd)
        res["ckpt_keys_equal_ddp"] = sorted(sd) == sorted(m_ddp.state_dict())
        res["ckpt_logit_scale_shape"] = list(sd["module.logit_scale"].shape)
        ddp_sd = m_ddp.state_dict()
        res["ckpt_vs_ddp_max_diff"] = max(float((sd[k].float() - ddp_sd[k].float()).abs().max()) for k in sd)
        # optimizer state: standard format, equal to DDP's
        osd, ddp_osd = checkpoint["optimizer"], o_ddp.state_dict()
        res["osd_keys_equal"] = sorted(osd["state"]) == sorted(ddp_osd["state"])
        res["osd_groups_equal"] = [g["params"] for g in osd["param_groups"]] == \
            [g["params"] for g in ddp_osd["param_groups"]]
        diffs = []
        for i, s in ddp_osd["state"].items():
            for k, v in s.items():
                w = osd["state"][i][k]
                assert tuple(w.shape) == tuple(v.shape), (i, k, w.shape, v.shape)
                diffs.append(float((w.float() - v.float()).abs().max()))
        res["osd_vs_ddp_max_diff"] = max(diffs)
        # evaluation on rank 0 only, with the unsharded replica
        replica = fsdp.eval_model(m_fsdp)
        replica.eval()
        m_ddp.eval()
        x, t = data[0]
        with torch.inference_mode():
            a, b = replica.module(x, t), m_ddp.module(x, t)
        res["eval_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in ("image_features", "text_features"))
        res["eval_logit_scale"] = [float(a["logit_scale"]), float(b["logit_scale"])]
        m_ddp.train()
        del replica
    dist.barrier()

    # sharded checkpoint
    fsdp.save_sharded(m_fsdp, o_fsdp, os.path.join(d, "sharded"), epoch=1)
    res["is_sharded"] = fsdp.is_sharded_checkpoint(os.path.join(d, "sharded"))
    res["is_sharded_file"] = fsdp.is_sharded_checkpoint(os.path.join(d, "ckpt.pt"))

    # two more steps of each: the references of the resumed runs
    res["ddp_next"] = run_steps(m_ddp, o_ddp, loss_fn, data[STEPS:])
    res["fsdp_next"] = run_steps(m_fsdp, o_fsdp, loss_fn, data[STEPS:])
    if rank == 0:  # the weights changed: the stash must not be used any more
        try:
            m_fsdp.state_dict()
            res["stale_after_step"] = "no error"
        except fsdp.StaleStateError:
            res["stale_after_step"] = "StaleStateError"
        try:
            o_fsdp.state_dict()
            res["opt_stale_after_step"] = "no error"
        except fsdp.StaleStateError:
            res["opt_stale_after_step"] = "StaleStateError"
    del m_fsdp, o_fsdp

    # grad checkpointing: set before wrapping (as open_clip does); two steps follow the trajectory
    m_gc = fsdp.wrap(build(grad_checkpointing=True), make_args(GAP, rank, world))
    o_gc = make_optimizer(m_gc)
    res["grad_ckpt"] = run_steps(m_gc, o_gc, loss_fn, data[:2])
    res["grad_ckpt_enabled"] = bool(unwrap(m_gc).transformer.grad_checkpointing)
    del m_gc, o_gc

    # ranks initialised differently (separation heads included): wrap() shards rank 0's weights
    m_r = build(seed=10 + rank, heads=True)
    mine = {n: p.detach().clone() for n, p in m_r.named_parameters()}
    sums = gather_records(float(sum(p.sum() for p in mine.values())))
    res["sync_init_differed"] = sums[0] != sums[1]
    m_r = fsdp.wrap(m_r, make_args(SEP, rank, world))
    fsdp.gather_full_state(m_r)
    if rank == 0:
        full = {k[len("module."):]: v for k, v in m_r.state_dict().items()}
        full.update({"structure_heads." + k: v for k, v in unwrap(m_r).structure_heads.state_dict().items()})
        res["sync_all_params"] = set(mine) <= set(full)
        res["sync_max_diff"] = max(float((full[n] - p).abs().max()) for n, p in mine.items())
    del m_r

    # --fsdp-param-dtype bf16: compute in bf16, keep fp32 shards (and fp32 gradient reduction)
    args_bf16 = make_args(GAP, rank, world)
    args_bf16.fsdp_param_dtype = "bf16"
    m_b = fsdp.wrap(build(), args_bf16)
    o_b = make_optimizer(m_b)
    res["bf16"] = run_steps(m_b, o_b, loss_fn, data[:2])
    res["bf16_shard_dtypes"] = sorted({str(p.dtype) for p in m_b.parameters()})
    del m_b, o_b

    # --precision amp path: torch's GradScaler, FSDP vs DDP; then an inf on one rank
    m_s, o_s = ddp(build()), None
    o_s = make_optimizer(m_s)
    res["scaler_ddp"] = run_steps(m_s, o_s, loss_fn, data[:2], scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    m_f = fsdp.wrap(build(), make_args(GAP, rank, world))
    o_f = make_optimizer(m_f)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # what open_clip builds
    res["scaler_fsdp"] = run_steps(m_f, o_f, loss_fn, data[:2], scaler=scaler)
    before = full_params(m_f)
    scale_before = scaler.get_scale()
    o_f.zero_grad()
    x, t = data[2]
    out = m_f(x, t)
    scaler.scale(sum(loss_fn(**out, output_dict=True).values())).backward()
    if rank == 1:  # an overflow in one rank's shard only
        p = next(p for p in unwrap(m_f).parameters() if p.grad is not None and fsdp.local_tensor(p.grad).numel())
        fsdp.local_tensor(p.grad).view(-1)[0] = float("inf")
    scaler.step(o_f)
    scaler.update()
    res["inf_params_unchanged"] = max_abs_diff(full_params(m_f), before) == 0.0
    res["inf_scales"] = gather_records([scale_before, scaler.get_scale()])
    del m_s, o_s, m_f, o_f

    # separation heads + two views (the launcher's --sep-weight / --gc-aug-weight model)
    sep_loss = create_loss(make_args(SEP, rank, world))
    data2 = batches(2, two_views=True, seed=2)
    m_h_ddp = ddp(build(heads=True))
    o_h_ddp = make_optimizer(m_h_ddp)
    res["heads_ddp"] = run_steps(m_h_ddp, o_h_ddp, sep_loss, data2)
    m_h = fsdp.wrap(build(heads=True), make_args(SEP, rank, world))
    o_h = make_optimizer(m_h)
    res["heads_fsdp"] = run_steps(m_h, o_h, sep_loss, data2)
    fsdp.gather_full_state(m_h, o_h)
    if rank == 0:
        heads_full = unwrap(m_h).structure_heads.state_dict()  # rank 0 only, no collective
        heads_ref = m_h_ddp.module.structure_heads.state_dict()
        res["heads_state_keys_equal"] = sorted(heads_full) == sorted(heads_ref)
        res["heads_state_max_diff"] = max(float((heads_full[k] - heads_ref[k]).abs().max()) for k in heads_ref)
        sd = m_h.state_dict()
        res["heads_hidden_from_ckpt"] = not any("structure_heads" in k for k in sd)
        res["heads_ckpt_keys_equal_ddp"] = sorted(sd) == sorted(m_h_ddp.state_dict())
    # heads restored from a full state dict on all ranks (what the launcher's pt_load hook does)
    ref = {k: v.detach().clone() for k, v in m_h_ddp.module.structure_heads.state_dict().items()}
    with torch.no_grad():
        for v in ref.values():
            v.add_(1.0)
    unwrap(m_h).structure_heads.load_state_dict(ref)
    fsdp.gather_full_state(m_h, o_h)
    if rank == 0:
        got = unwrap(m_h).structure_heads.state_dict()
        res["heads_load_max_diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    # CoCa: its text decoder's self- and cross-attention blocks are sharded too
    res["coca"] = {}
    ref_keys = None  # the DDP run (first) records the state_dict keys the FSDP run must match
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        m = open_clip.create_model("fsdp-test-coca", output_dict=True)
        with torch.no_grad():  # open_clip 3.3 leaves this one uninitialised (torch.empty)
            torch.nn.init.normal_(m.text_decoder.text_projection, std=0.02)
        m = ddp(m) if mode == "ddp" else fsdp.wrap(m, make_args(GAP, rank, world))
        if mode == "fsdp":
            res["coca_blocks"] = [n for n, _ in fsdp.shard_modules(unwrap(m))]
        o = make_optimizer(m)
        coca_args = make_args(["--model", "coca-test"], rank, world)
        coca_loss = create_loss(coca_args)  # open_clip's CoCaLoss
        g = torch.Generator().manual_seed(3)
        b = GLOBAL_BATCH // world
        steps = []
        for _ in range(2):
            x = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)[rank * b:(rank + 1) * b]
            t = torch.randint(1, 49407, (GLOBAL_BATCH, 15), generator=g)[rank * b:(rank + 1) * b]
            steps.append(gather_records(train_step(m, o, coca_loss, x, t)))
        res["coca"][mode] = steps
        if mode == "fsdp":
            fsdp.gather_full_state(m, o)
            if rank == 0:
                res["coca_ckpt_keys_equal_ddp"] = sorted(m.state_dict()) == sorted(ref_keys)
        else:
            ref_keys = list(m.state_dict())
        del m, o

    # the heads travel in sharded checkpoints too
    fsdp.save_sharded(m_h, o_h, os.path.join(d, "heads_sharded"), epoch=2)
    m_h2 = fsdp.wrap(build(seed=9, heads=True), make_args(SEP, rank, world))
    o_h2 = make_optimizer(m_h2)
    res["heads_sharded_epoch"] = fsdp.load_sharded(m_h2, o_h2, os.path.join(d, "heads_sharded"))
    fsdp.gather_full_state(m_h2, o_h2)
    if rank == 0:
        a, b = unwrap(m_h).structure_heads.state_dict(), unwrap(m_h2).structure_heads.state_dict()
        res["heads_sharded_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        a, b = m_h.state_dict(), m_h2.state_dict()
        res["heads_model_sharded_max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
        a, b = o_h.state_dict(), o_h2.state_dict()
        res["heads_opt_sharded_max_diff"] = max(float((a["state"][i][k] - b["state"][i][k]).abs().max())
                                                for i in a["state"] for k in a["state"][i])
    return res


def phase_resume(job, rank, world):
    d = job["dir"]
    res = {}
    loss_fn = create_loss(make_args(GAP, rank, world))
    data = batches(STEPS + EXTRA)[STEPS:]

    def load(name):  # every rank, a fresh copy per run: torch's optimizer.load_state_dict keeps (and then
        # updates in place) tensors of the dict it is given, e.g. state["step"]
        return torch.load(os.path.join(d, name), map_location="cpu", weights_only=True)

    # FSDP, fresh weights (another seed), resumed as open_clip_train.main resumes a distributed run
    m = fsdp.wrap(build(seed=123), make_args(GAP, rank, world))
    o = fsdp.bind_optimizer(m, make_optimizer(m))
    checkpoint = load("ckpt.pt")
    m.load_state_dict(checkpoint["state_dict"])
    o.load_state_dict(checkpoint["optimizer"])
    res["fsdp_full"] = run_steps(m, o, loss_fn, data)
    del m, o

    # FSDP from an unprefixed state dict (e.g. the output of a non-distributed run)
    m = fsdp.wrap(build(seed=7), make_args(GAP, rank, world))
    o = fsdp.bind_optimizer(m, make_optimizer(m))
    checkpoint = load("ckpt.pt")
    m.load_state_dict({k[len("module."):]: v for k, v in checkpoint["state_dict"].items()})
    o.load_state_dict(checkpoint["optimizer"])
    res["fsdp_full_unprefixed"] = run_steps(m, o, loss_fn, data)
    del m, o

    # DDP resumed from the checkpoint the FSDP run wrote
    m = ddp(build(seed=123))
    o = make_optimizer(m)
    checkpoint = load("ckpt.pt")
    m.load_state_dict(checkpoint["state_dict"])
    o.load_state_dict(checkpoint["optimizer"])
    res["ddp_full"] = run_steps(m, o, loss_fn, data)
    del m, o

    # FSDP resumed from the DDP run's own state (a DDP checkpoint into an FSDP run)
    m = fsdp.wrap(build(seed=5), make_args(GAP, rank, world))
    o = fsdp.bind_optimizer(m, make_optimizer(m))
    m.load_state_dict({"module." + k: v for k, v in load("ddp_state.pt").items()})
    o.load_state_dict(load("ddp_optimizer.pt"))
    res["fsdp_from_ddp"] = run_steps(m, o, loss_fn, data)
    del m, o

    # sharded checkpoint, through the checkpoint-like dict a pt_load hook hands to open_clip
    m = fsdp.wrap(build(seed=321), make_args(GAP, rank, world))
    o = fsdp.bind_optimizer(m, make_optimizer(m))
    ck = fsdp.sharded_resume_checkpoint(m, os.path.join(d, "sharded"))
    m.load_state_dict(ck["state_dict"])   # what open_clip then does: no-ops
    o.load_state_dict(ck["optimizer"])
    res["sharded_epoch"] = ck["epoch"]
    res["fsdp_sharded"] = run_steps(m, o, loss_fn, data)
    return res


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    register_model_configs()
    open_clip.add_model_config(os.path.join(job["dir"], "configs"))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"train": phase_train, "resume": phase_resume}[job["phase"]](job, rank, world)
    if rank == 0:
        with open(os.path.join(job["dir"], job["phase"] + ".json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # torch's gloo backend sometimes aborts at interpreter exit after a clean shutdown
    os._exit(0)
