"""FSDP2 (openclip_structure.fsdp) against DDP in real 2-process runs (torchrun, gloo, CPU):
the same loss trajectory, full checkpoints that plain open_clip loads and that DDP and FSDP runs
resume from interchangeably, sharded (torch.distributed.checkpoint) checkpoints, evaluation on
rank 0 only, grad checkpointing, torch's GradScaler under FSDP, the separation heads and two views.

The worker is tests/fsdp_worker.py; two torchrun launches (train, then resume in fresh processes).
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from openclip_structure import fsdp

HERE = os.path.dirname(__file__)
REL = 1e-5


def torchrun(job, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "fsdp_worker.py"), json.dumps(job)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(os.path.join(job["dir"], job["phase"] + ".json")) as f:
        return json.load(f)


# a CoCa small enough for CPU (its multimodal width must equal embed_dim)
COCA = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8,
                       "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {"context_length": 15, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                     "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 15, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                           "attn_pooler_heads": 2},
        "custom_text": True}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    (d / "configs").mkdir()
    (d / "configs" / "fsdp-test-coca.json").write_text(json.dumps(COCA))
    return str(d)


@pytest.fixture(scope="module")
def train(run_dir):
    return torchrun({"phase": "train", "dir": run_dir})


@pytest.fixture(scope="module")
def resume(run_dir, train):
    return torchrun({"phase": "resume", "dir": run_dir})


def assert_same_trajectory(got, ref, rel=REL, keys=None):
    """Per step, per rank: every loss term (and the clipped gradient norm) agrees."""
    assert len(got) == len(ref)
    for step, (g_ranks, r_ranks) in enumerate(zip(got, ref)):
        for rank, (g, r) in enumerate(zip(g_ranks, r_ranks)):
            for key in keys or [k for k in r if k != "logit_scale_shape"]:
                assert g[key] == pytest.approx(r[key], rel=rel, abs=1e-6), (step, rank, key, g[key], r[key])


# ---- training -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp_follows_the_ddp_trajectory(train):
    assert train["fsdp_container_type"] == "FSDPModel"
    assert train["n_groups"] == train["n_groups_ddp"]  # open_clip's AdamW groups from named_parameters()
    assert_same_trajectory(train["fsdp"], train["ddp"])
    assert {k for k in train["fsdp"][0][0]} >= {"contrastive_loss", "gap_atp_loss", "gap_cu_loss"}
    assert all(r["logit_scale_shape"] == [] for step in train["fsdp"] for r in step)  # 0-D as without FSDP
    assert train["params_after_3_max_diff"] < 1e-5
    assert_same_trajectory(train["fsdp_next"], train["ddp_next"])


@pytest.mark.slow
def test_parameters_are_sharded(train):
    assert train["sharded_param_bytes"] <= 0.51 * train["full_param_bytes"]


@pytest.mark.slow
def test_grad_checkpointing(train):
    assert train["grad_ckpt_enabled"]
    assert all(math.isfinite(r["contrastive_loss"]) for step in train["grad_ckpt"] for r in step)
    assert_same_trajectory(train["grad_ckpt"], train["fsdp"][:2])


@pytest.mark.slow
def test_wrap_shards_rank0_weights(train):
    """Ranks initialised with different seeds: after wrap() every shard holds rank 0's weights
    (torch's set_model_state_dict(broadcast_from_rank0=True)), the hidden separation heads too."""
    assert train["sync_init_differed"]
    assert train["sync_all_params"]
    assert train["sync_max_diff"] == 0.0


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_shards(train):
    assert train["bf16_shard_dtypes"] == ["torch.float32"]
    assert_same_trajectory(train["bf16"], train["fsdp"][:2], rel=3e-2, keys=["contrastive_loss"])


@pytest.mark.slow
def test_grad_scaler(train):
    assert_same_trajectory(train["scaler_fsdp"], train["scaler_ddp"])
    # an inf in one rank's gradient shard: every rank skips the step and backs off the scale
    assert train["inf_params_unchanged"]
    assert train["inf_scales"] == [[1024.0, 512.0], [1024.0, 512.0]]


@pytest.mark.slow
def test_separation_heads_and_two_views(train):
    assert_same_trajectory(train["heads_fsdp"], train["heads_ddp"])
    assert train["heads_state_keys_equal"] and train["heads_state_max_diff"] < 1e-5
    assert train["heads_hidden_from_ckpt"] and train["heads_ckpt_keys_equal_ddp"]
    assert train["heads_load_max_diff"] == 0.0
    assert train["heads_sharded_epoch"] == 2
    assert train["heads_sharded_max_diff"] == 0.0
    assert train["heads_model_sharded_max_diff"] == 0.0
    assert train["heads_opt_sharded_max_diff"] == 0.0


@pytest.mark.slow
def test_coca_decoder_blocks_are_sharded(train):
    blocks = train["coca_blocks"]
    assert {f"text_decoder.resblocks.{i}" for i in range(2)} | {f"text_decoder.cross_attn.{i}" for i in range(2)} \
        <= set(blocks)
    assert {f"visual.transformer.resblocks.{i}" for i in range(2)} | \
        {f"text.transformer.resblocks.{i}" for i in range(2)} <= set(blocks)
    assert_same_trajectory(train["coca"]["fsdp"], train["coca"]["ddp"])
    assert {"contrastive_loss", "caption_loss"} <= set(train["coca"]["fsdp"][0][0])
    assert train["coca_ckpt_keys_equal_ddp"]


# ---- full checkpoints -------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_checkpoint_is_a_ddp_checkpoint(train):
    assert train["stale_before_gather"] == "StaleStateError"  # rank 0 alone: an error, not a hang
    assert train["has_full_state"]
    assert train["ckpt_keys_prefixed"] and train["ckpt_keys_equal_ddp"]
    assert train["ckpt_logit_scale_shape"] == []
    assert train["ckpt_vs_ddp_max_diff"] < 1e-5
    assert train["osd_keys_equal"] and train["osd_groups_equal"]
    assert train["osd_vs_ddp_max_diff"] < 1e-5
    assert train["stale_after_step"] == "StaleStateError"
    assert train["opt_stale_after_step"] == "StaleStateError"


LOAD_WITH_PLAIN_OPEN_CLIP = r"""
import json, sys, torch, open_clip
open_clip.add_model_config(sys.argv[1])
model = open_clip.create_model("structure-tiny", pretrained=sys.argv[2])
ref = torch.load(sys.argv[3], map_location="cpu", weights_only=True)
sd = model.state_dict()
print(json.dumps({"keys_equal": sorted(sd) == sorted(ref),
                  "max_diff": max(float((sd[k] - ref[k]).abs().max()) for k in ref)}))
"""


@pytest.mark.slow
def test_plain_open_clip_loads_the_fsdp_checkpoint(train, run_dir):
    import openclip_structure

    config_dir = os.path.join(os.path.dirname(openclip_structure.__file__), "model_configs")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_PLAIN_OPEN_CLIP, config_dir,
                           os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "ddp_state.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["keys_equal"]
    assert out["max_diff"] < 1e-5


@pytest.mark.slow
def test_rank0_evaluation_replica(train):
    assert train["eval_max_diff"] < 1e-5
    assert train["eval_logit_scale"][0] == pytest.approx(train["eval_logit_scale"][1], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["fsdp_full", "fsdp_full_unprefixed", "ddp_full", "fsdp_from_ddp"])
def test_resume_from_full_checkpoint(train, resume, run):
    """Two steps after resuming (the second depends on the restored optimizer state) match the
    run that kept training."""
    assert_same_trajectory(resume[run], train["fsdp_next"])
    assert_same_trajectory(resume[run], train["ddp_next"])


@pytest.mark.slow
def test_resume_from_sharded_checkpoint(train, resume):
    assert train["is_sharded"] and not train["is_sharded_file"]
    assert resume["sharded_epoch"] == 1
    assert_same_trajectory(resume["fsdp_sharded"], train["fsdp_next"], rel=1e-6)


# ---- single process: no effect unless used -----------------------------------------------------------

def test_mixed_precision_policy_from_flags():
    import argparse

    p = fsdp.mixed_precision_policy(argparse.Namespace(fsdp_param_dtype="fp32", fsdp_reduce_dtype="fp32"))
    assert p.param_dtype is None and p.reduce_dtype is None  # compute in the stored dtype
    p = fsdp.mixed_precision_policy(argparse.Namespace(fsdp_param_dtype="bf16", fsdp_reduce_dtype="fp32"))
    assert p.param_dtype is torch.bfloat16 and p.reduce_dtype is torch.float32
    p = fsdp.mixed_precision_policy(argparse.Namespace(fsdp_param_dtype="fp16", fsdp_reduce_dtype="bf16"))
    assert p.param_dtype is torch.float16 and p.reduce_dtype is torch.bfloat16
    with pytest.raises(ValueError):
        fsdp.mixed_precision_policy(argparse.Namespace(fsdp_param_dtype="fp8", fsdp_reduce_dtype="fp32"))


def test_optimizer_hook_is_inert_without_a_wrapped_model():
    from openclip_structure.integration import parallel, state

    orig_init = torch.optim.Optimizer.__init__
    with state.running():
        opt = parallel.wrap_optimizer(torch.optim.AdamW)(torch.nn.Linear(2, 2).parameters())
    assert torch.optim.Optimizer.__init__ is orig_init and type(opt) is torch.optim.AdamW
    assert "state_dict" not in opt.__dict__ and "load_state_dict" not in opt.__dict__


def test_is_sharded_checkpoint(tmp_path):
    f = tmp_path / "epoch_1.pt"
    f.write_bytes(b"x")
    assert not fsdp.is_sharded_checkpoint(str(f))
    assert not fsdp.is_sharded_checkpoint(str(tmp_path))
    (tmp_path / ".metadata").write_bytes(b"")
    assert fsdp.is_sharded_checkpoint(str(tmp_path))
    assert not fsdp.is_sharded_checkpoint(None)


def test_wrap_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="process group"):
        fsdp.wrap(torch.nn.Linear(2, 2))


def test_shard_modules_finds_the_blocks_of_both_towers():
    import open_clip
    from openclip_structure.main import register_model_configs

    register_model_configs()
    model = open_clip.create_model("structure-tiny")
    names = [n for n, _ in fsdp.shard_modules(model)]
    assert names == [f"visual.transformer.resblocks.{i}" for i in range(2)] + \
        [f"transformer.resblocks.{i}" for i in range(2)]
