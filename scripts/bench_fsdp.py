"""Memory per process: DDP vs FSDP2 (openclip_structure.fsdp) for a ViT-B-32-sized open_clip model.

    python scripts/bench_fsdp.py [--nproc 2] [--steps 3] [--batch 2] [--device cpu|cuda] [--json out.json]
    python scripts/bench_fsdp.py --model structure-tiny --plugin-flags "--gap-atp-weight 1"   # plugin loss

runs ``torchrun --standalone --nproc_per_node N`` twice (once per mode, so each process's peak
is its own) on this file in worker mode. Each rank creates the model with random weights (the
config is ViT-B-32's, written to a temporary json and registered with ``open_clip.add_model_config``),
wraps it (the plugin's CPU-capable DDP, or ``fsdp.wrap``), builds open_clip_train's AdamW from the
wrapped model's ``named_parameters()``, and takes ``--steps`` steps of batch ``--batch`` per rank
with open_clip's ClipLoss (--local-loss --gather-with-grad), or the plugin's loss built from
``--plugin-flags``. The data is one fixed global batch of ``nproc x --batch`` random images and
token ids (seeded), each rank taking its slice, so runs with another ``--nproc`` see the same
global batch. Reported per rank:

* ``rss_start_mb``: RSS once torch/open_clip are imported, before the model exists (the baseline);
* ``peak_rss_mb``: the process's peak RSS, model creation and wrapping included (the larger of
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read before the reset below and at the end);
* ``train_peak_rss_mb``: the peak during the training steps only (Linux: VmHWM after resetting it
  through /proc/self/clear_refs once the model is wrapped and the optimizer built);
* ``param_mb`` / ``grad_mb`` / ``optim_state_mb``: bytes of this rank's parameters, gradients and
  AdamW state (local shards under FSDP);
* ``cuda_peak_mb`` with ``--device cuda`` (one GPU per rank, NCCL; ``--share-device`` puts every
  rank on GPU 0, which NCCL normally refuses: "Duplicate GPU detected");
* ``losses``: the loss of every step (total of all terms, averaged over the ranks: the global-batch
  loss), so the trajectories of DDP and FSDP runs can be compared (``scripts/gpu_check.py``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

VIT_B_32 = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
NAME = "bench-ViT-B-32"


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2 ** 20, 1)


def _vm(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024  # kB -> MB
    except OSError:
        pass
    return float("nan")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_loss(plugin_flags: str, rank: int, world: int):
    """open_clip's ClipLoss (local loss, gather with grad), plus the plugin's terms from the flags."""
    from open_clip.loss import ClipLoss

    if not plugin_flags.strip():
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    from bench_step import make_args  # (this directory is on sys.path: the script runs as a file)
    from openclip_structure.factory import create_loss

    args = make_args(plugin_flags.split())
    args.rank, args.world_size, args.local_loss, args.gather_with_grad = rank, world, True, True
    return create_loss(args)


def worker(mode: str, steps: int, batch: int, device_kind: str, config_dir: str, model_name: str = NAME,
           plugin_flags: str = "", share_device: bool = False, lr: float = 1e-4) -> None:
    import torch
    import torch.distributed as dist

    import open_clip

    if device_kind == "cuda":
        local_rank = 0 if share_device else int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_start = _vm("VmRSS")  # libraries loaded, no model yet
    open_clip.add_model_config(config_dir)
    from openclip_structure.main import register_model_configs
    register_model_configs()  # structure-tiny
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, output_dict=True, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "ddp":
        from openclip_structure.integration.parallel import CPUFriendlyDDP
        model = CPUFriendlyDDP(model, device_ids=[device])
    else:
        from openclip_structure import fsdp
        model = fsdp.wrap(model, argparse.Namespace(fsdp_param_dtype="fp32", fsdp_reduce_dtype="fp32"))

    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.2}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = make_loss(plugin_flags, rank, world)
    # one fixed global batch (the same for any number of ranks), this rank's slice of it
    g = torch.Generator().manual_seed(1)
    inner = model.module if hasattr(model, "module") else model
    size = inner.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch * world, 3, *size, generator=g)[rank * batch:(rank + 1) * batch].to(device)
    texts = torch.randint(1, inner.vocab_size - 1, (batch * world, inner.context_length),
                          generator=g)[rank * batch:(rank + 1) * batch].to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    rss_before = _vm("VmRSS")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # clear_refs resets it too
    reset = _reset_peak_rss()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        out = model(images, texts)
        loss = loss_fn(**out)
        loss = sum(loss.values()) if isinstance(loss, dict) else loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        value = loss.detach().clone().reshape(1)
        dist.all_reduce(value)
        losses.append(float(value) / world)
        assert math.isfinite(losses[-1])

    def local_bytes(tensors):
        total = 0
        for t in tensors:
            t = getattr(t, "_local_tensor", t)
            total += t.numel() * t.element_size()
        return total

    params = [p for p in model.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel")]
    rec = {
        "rank": rank,
        "params_total_M": round(n_params / 1e6, 1),
        "param_mb": _mb(local_bytes(params)),
        "grad_mb": _mb(local_bytes(grads)),
        "optim_state_mb": _mb(local_bytes(state)),
        "rss_start_mb": round(rss_start, 1),
        "rss_before_train_mb": round(rss_before, 1),
        "train_peak_rss_mb": round(_vm("VmHWM"), 1) if reset else None,
        "peak_rss_mb": round(max(peak_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024, 1),
        "step_s": round(sum(times[1:]) / max(1, len(times) - 1), 2),
        "losses": losses,
    }
    if device.type == "cuda":
        rec["cuda_peak_mb"] = _mb(torch.cuda.max_memory_allocated(device))
    recs = [None] * world
    dist.all_gather_object(recs, rec)
    if rank == 0:
        print("RESULT " + json.dumps({"mode": mode, "world_size": world, "ranks": recs}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo sometimes aborts at interpreter exit after a clean shutdown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--modes", default="ddp,fsdp")
    ap.add_argument("--model", default=NAME, help=f"open_clip model name ({NAME} = ViT-B-32's config, written here; "
                                                  "structure-tiny for a quick run)")
    ap.add_argument("--plugin-flags", default="", help="plugin flags of the loss, e.g. '--gap-atp-weight 1' "
                                                       "(default: open_clip's ClipLoss alone)")
    ap.add_argument("--share-device", action="store_true", help="every rank on GPU 0 (--device cuda)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per torchrun launch")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20,
                    help="MALLOC_MMAP_THRESHOLD_ for the workers (glibc): tensors above it are mmapped and "
                         "given back to the OS when freed, so RSS follows live memory; 0 keeps glibc's dynamic "
                         "default, under which freed all-gather/reduce-scatter buffers stay in RSS as fragmentation")
    ap.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--config-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.steps, args.batch, args.device, args.config_dir, args.model,
                      args.plugin_flags, args.share_device, args.lr)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, NAME + ".json"), "w") as f:
            json.dump(VIT_B_32, f)
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's package
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        if args.malloc_mmap_threshold > 0:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        for mode in args.modes.split(","):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                   os.path.abspath(__file__), "--worker", mode, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--device", args.device, "--config-dir", tmp, "--model", args.model,
                   "--plugin-flags=" + args.plugin_flags, "--lr", str(args.lr)] + (
                ["--share-device"] if args.share_device else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"{mode} run failed (exit {proc.returncode})")
            results.append(json.loads(lines[-1][len("RESULT "):]))
    keys = ["params_total_M", "param_mb", "grad_mb", "optim_state_mb", "rss_start_mb", "rss_before_train_mb",
            "train_peak_rss_mb",
            "peak_rss_mb", "step_s"] + (["cuda_peak_mb"] if args.device == "cuda" else [])
    print("| mode | rank | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in results:
        for rec in r["ranks"]:
            print(f"| {r['mode']} | {rec['rank']} | " + " | ".join(str(rec.get(k)) for k in keys) + " |")
    print(f"(MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'glibc default'}, {args.nproc} processes, "
          f"batch {args.batch}/rank, {args.steps} steps, device {args.device})")
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
