"""Real multi-process runs (torchrun, gloo, CPU) at 1, 2 and 4 processes on the same global batch:
a regularizer weight means the same on any number of processes.

For every open_clip base loss (ClipLoss in each --local-loss/--gather-with-grad combination,
SigLipLoss in each --loss-dist-impl, CoCaLoss, DistillClipLoss) with every regularizer on, the
gradient DDP applies must be ``c x`` the single-process gradient, with ONE ``c`` for the base loss
and every term: ``c`` is MEASURED here from open_clip's own base loss (the ratio of its applied
gradient to its single-process gradient), and checked against the derivation (1/W for ClipLoss
with the default flags, 1 with --gather-with-grad and for SigLIP). open_clip itself gives the logit
scale (and SigLIP's bias) its single-process gradient in every mode, also where the towers get 1/W:
there the terms follow the base parameter by parameter. AdamW with eps 1e-12 is invariant to a
constant gradient scale per parameter, so whole DDP training steps then follow the single-process
trajectory whatever W is.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from openclip_structure.registry import TERMS, weight_flags

sys.path.insert(0, os.path.dirname(__file__))
import ddp_worker  # noqa: E402

WEIGHTS = {"gc": 0.5, "gc_aug": 0.5, "sep": 0.5}  # every other registry term at 1
ALL_TERMS = weight_flags(WEIGHTS, default=1) + ["--text-aug", "eda"]  # every registry term
GAP_VARIANT = ["--gap-atp-weight", "2", "--gap-cu-weight", "0.5", "--gap-uniformity", "modality",
               "--gap-anchor", "text", "--gc-weight", "0.25"]
NON_VIEW = weight_flags({s.key: WEIGHTS.get(s.key, 1) for s in TERMS if not s.views})  # distillation: no views


def _cfg(base, local_loss, gather_with_grad, flags=ALL_TERMS):
    return {"flags": flags, "local_loss": local_loss, "gather_with_grad": gather_with_grad, "base": base}


CONFIGS = ([_cfg("clip", ll, gg) for ll, gg in ((False, False), (True, True), (False, True), (True, False))]
           + [_cfg("clip", False, False, GAP_VARIANT)]
           + [_cfg(f"siglip:{impl}", False, False) for impl in ("bidir", "shift", "reduce", "gather")]
           + [_cfg("coca", False, False), _cfg("coca", True, True)]
           + [_cfg("distill", False, False, NON_VIEW), _cfg("distill", True, True, NON_VIEW)])
WORLD_SIZES = (2, 4)


def expected_scale(cfg, world_size):
    """(c of the regularizers, {base key: its own applied-gradient ratio or None = not a scaled
    single-process gradient}) from the derivation in openclip_structure/scaling.py."""
    if cfg["base"].startswith("siglip"):
        return 1.0, {"contrastive_loss": 1.0}
    ll, gg = cfg["local_loss"], cfg["gather_with_grad"]
    clip = 1.0 if gg else (None if ll else 1.0 / world_size)
    c = 1.0 if clip is None else clip
    if cfg["base"] == "coca":
        return c, {"contrastive_loss": clip, "caption_loss": 1.0}
    if cfg["base"] == "distill":
        return c, {"contrastive_loss": clip, "distill_loss": clip}
    return c, {"contrastive_loss": clip}


def label(cfg):
    return f"{cfg['base']} local={cfg['local_loss']} gwg={cfg['gather_with_grad']} {' '.join(cfg['flags'][:2])}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env_ws = os.environ.get("WORLD_SIZE")
    assert env_ws in (None, "1"), "run the test outside torchrun"
    out = {1: [ddp_worker.run(c["flags"], c["local_loss"], c["gather_with_grad"], c["base"]) for c in CONFIGS]}
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    for n in WORLD_SIZES:
        path = tmp_path_factory.mktemp(f"ddp{n}") / "results.json"
        job = json.dumps({"out": str(path), "configs": CONFIGS})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               os.path.join(os.path.dirname(__file__), "ddp_worker.py"), job]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[n] = json.loads(path.read_text())
    return out


def flat(grads):
    return np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in grads])


TEMPERATURE = ("logit_scale", "logit_bias")  # open_clip: single-process gradient in every mode


def groups(result, grads):
    """(embedding-parameter gradients, temperature-parameter gradients) of one loss key."""
    names = result["param_names"]
    emb = [g for n, g in zip(names, grads) if n not in TEMPERATURE]
    temp = [g for n, g in zip(names, grads) if n in TEMPERATURE]
    return emb, temp


def ratio_and_residual(applied, single):
    """Least-squares r with applied ~ r * single, and the relative residual |applied - r single|/|single|
    (None when single is zero)."""
    a, b = flat(applied), flat(single)
    if not np.any(b):
        return None, None
    r = float(a @ b / (b @ b))
    return r, float(np.linalg.norm(a - r * b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_one_gradient_scale_for_base_and_terms(results, index, world_size):
    cfg = CONFIGS[index]
    one, many = results[1][index], results[world_size][index]
    c, base_ratios = expected_scale(cfg, world_size)
    assert many["grad_scale"] == pytest.approx(c, rel=1e-15)
    # open_clip's own base loss: measured ratio of its applied gradient to its single-process one
    for key, want in base_ratios.items():
        (emb_many, temp_many), (emb_one, temp_one) = (groups(one, many["terms"][key]["grad"]),
                                                      groups(one, one["terms"][key]["grad"]))
        r, residual = ratio_and_residual(emb_many, emb_one)
        print(f"{label(cfg)} W={world_size} base {key}: embedding-gradient ratio {r:.6f} (residual {residual:.1e})")
        if want is None:  # --local-loss without --gather-with-grad: not a scaled gradient at all
            assert residual > 1e-3, key
        else:
            assert residual < 1e-10 and r == pytest.approx(want, rel=1e-10), (key, r, residual)
        r, residual = ratio_and_residual(temp_many, temp_one)
        if r is not None:
            assert residual < 1e-10 and r == pytest.approx(1.0, rel=1e-10), (key, "logit scale", r, residual)
    # every regularizer: the same value, and c times its single-process gradient (temperature: 1 x)
    terms = [k for k in one["terms"] if k not in ddp_worker.BASE_KEYS]
    assert len(terms) >= (3 if cfg["flags"] in (NON_VIEW, GAP_VARIANT) else 9), terms
    factors = np.concatenate([np.full(np.asarray(g).size, 1.0 if n in TEMPERATURE else c)
                              for n, g in zip(one["param_names"], one["terms"][terms[0]]["grad"])])
    for key in terms:
        a, b = many["terms"][key], one["terms"][key]
        assert a["value"] == pytest.approx(b["value"], rel=1e-12, abs=1e-12), key
        diff = float(np.max(np.abs(flat(a["grad"]) - factors * flat(b["grad"]))))
        size = float(np.max(np.abs(flat(b["grad"]))))
        print(f"{label(cfg)} W={world_size} {key}: |value diff| {abs(a['value'] - b['value']):.1e}, "
              f"max |grad - c grad_1| {diff:.1e} (max |grad_1| {size:.1e})")
        assert size > 1e-3 and diff < 1e-12 * max(1.0, size), key


@pytest.mark.slow
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_ddp_training_follows_the_single_process_run(results, index, world_size):
    """Wherever open_clip's base gradient is a scaled single-process gradient, 3 AdamW steps on W
    processes give the single-process parameters, every regularizer on."""
    cfg = CONFIGS[index]
    c, base_ratios = expected_scale(cfg, world_size)
    if any(v is None or v != c for v in base_ratios.values()):
        pytest.skip("open_clip's base gradient is not one scaled single-process gradient for these flags")
    one, many = results[1][index], results[world_size][index]
    for step_one, step_many in zip(one["trajectory"], many["trajectory"]):
        for key in step_one:
            if key not in ddp_worker.BASE_KEYS:
                assert step_many[key] == pytest.approx(step_one[key], rel=1e-9, abs=1e-12), key
    diff = float(np.max(np.abs(flat(many["params"]) - flat(one["params"]))))
    print(f"{label(cfg)} W={world_size}: max |param diff| after 3 AdamW steps {diff:.1e}")
    # lr 0.05: an unscaled regularizer moves parameters by ~1e-2 here; round-off, amplified by
    # AdamW's normalisation of near-zero gradient entries, stays at ~1e-9
    assert diff < 1e-7


def test_scale_table_and_startup_message():
    """The factor the terms use, and the one-line reason the launcher logs (a warning when open_clip's
    base gradient is not a scaled single-process gradient: the flags to use instead are named)."""
    from torch import nn
    from open_clip.loss import ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss

    from openclip_structure.scaling import base_gradient_scale

    def clip(ll, gg, cls=ClipLoss, **kw):
        return cls(local_loss=ll, gather_with_grad=gg, rank=0, world_size=8, **kw)

    cases = [
        (clip(False, False), 1 / 8, True), (clip(True, True), 1.0, True), (clip(False, True), 1.0, True),
        (clip(True, False), 1.0, False), (clip(False, False, DistillClipLoss), 1 / 8, True),
        (clip(False, False, CoCaLoss, caption_loss_weight=2.0, clip_loss_weight=1.0), 1 / 8, False),
        (clip(True, True, CoCaLoss, caption_loss_weight=2.0, clip_loss_weight=1.0), 1.0, True),
        (SigLipLoss(rank=0, world_size=8, dist_impl="reduce"), 1.0, True), (nn.MSELoss(), 1.0, False),
    ]
    for base, factor, exact in cases:
        s = base_gradient_scale(base, 8)
        assert (s.factor, s.exact, s.logit_scale) == (pytest.approx(factor), exact, 1.0), type(base).__name__
        if isinstance(base, nn.MSELoss):
            assert "unknown" in s.reason
        else:
            assert ("--local-loss --gather-with-grad" in s.reason) == (not exact), s.reason
        assert base_gradient_scale(base, 1).factor == 1.0
    assert "1/8" in base_gradient_scale(clip(False, False), 8).reason
