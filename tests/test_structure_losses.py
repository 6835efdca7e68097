"""Latent-modality-structure terms (Jiang et al., CVPR 2023) and CyCLIP's in-modal terms against
explicit Python double loops over samples, gradcheck, the Brownian-bridge misprint, bad inputs, and
exactness over 1 vs 2 processes (torchrun, gloo, CPU)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from openclip_structure.losses.runtime import FeatureBatch
from openclip_structure.losses import (AugmentedGeometricConsistency, BrownianBridge, GeometricConsistency,
                                       IndependentHead, InModalContrastive, SeparationInModalContrast,
                                       SeparationOrthogonality, SeparationUniformity,
                                       augmented_geometric_consistency, brownian_bridge, geometric_consistency,
                                       in_modal_contrastive)

sys.path.insert(0, os.path.dirname(__file__))
import structure_ddp_worker  # noqa: E402


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


# ---- independent references: plain Python loops over samples (float64 Python floats) ---------

def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def sqdist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def ref_gc(v, t):
    v, t = v.tolist(), t.tolist()
    n = len(v)
    total = 0.0
    for j in range(n):
        for k in range(n):
            total += (dot(v[j], t[k]) - dot(v[k], t[j])) ** 2 + (dot(v[j], v[k]) - dot(t[j], t[k])) ** 2
    return total / n


def ref_gc_aug(v, t, va, ta):
    v, t, va, ta = v.tolist(), t.tolist(), va.tolist(), ta.tolist()
    n = len(v)
    total = 0.0
    for j in range(n):
        for k in range(n):
            total += (dot(v[j], v[k]) - dot(va[j], va[k])) ** 2 + (dot(t[j], t[k]) - dot(ta[j], ta[k])) ** 2
    for j in range(n):
        total += (dot(v[j], t[j]) - dot(va[j], ta[j])) ** 2
    return total / n


def ref_bridge(v, t, va, ts):
    v, t, va = v.tolist(), t.tolist(), va.tolist()
    n = len(v)
    total = 0.0
    for j in range(n):
        m = [ts[j] * a + (1 - ts[j]) * b for a, b in zip(v[j], t[j])]
        norm = math.sqrt(dot(m, m))
        total += sqdist(va[j], [x / norm for x in m])
    return total / n


def misprinted_bridge(v, t, va, tt):
    """The paper's "simplified" line as the spec describes it: the bridge distance with the "2 - 2"
    and the square root of the normaliser dropped, <zaV, t zV + (1-t) zT> / ||t zV + (1-t) zT||^2."""
    v, t, va = v.tolist(), t.tolist(), va.tolist()
    n = len(v)
    total = 0.0
    for j in range(n):
        m = [tt * a + (1 - tt) * b for a, b in zip(v[j], t[j])]
        total += dot(va[j], m) / (tt ** 2 + (1 - tt) ** 2 + 2 * tt * (1 - tt) * dot(v[j], t[j]))
    return total / n


def ref_ortho(v, t, iv, it):
    v, t, iv, it = v.tolist(), t.tolist(), iv.tolist(), it.tolist()
    return sum(dot(v[j], iv[j]) ** 2 + dot(t[j], it[j]) ** 2 for j in range(len(v))) / len(v)


def ref_info_nce(rows, cols, scale):
    rows, cols = rows.tolist(), cols.tolist()
    n = len(rows)
    total = 0.0
    for i in range(n):
        logits = [scale * dot(rows[i], cols[k]) for k in range(n)]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[i]
    return total / n


def ref_iuni(iv, it):
    iv, it = iv.tolist(), it.tolist()
    n = len(iv)
    total = 0.0
    for j in range(n):
        for k in range(n):  # all pairs, the diagonal included
            total += math.exp(-2 * sqdist(iv[j], iv[k])) + math.exp(-2 * sqdist(it[j], it[k]))
    return math.log(total / n ** 2)


N, D = 6, 4


@pytest.fixture
def z():
    names = ["image", "text", "image_aug", "text_aug", "image_ind", "text_ind", "image_aug_ind", "text_aug_ind"]
    return {k: unit(N, D, seed=s) for s, k in enumerate(names)}


# ---- values against the loops -----------------------------------------------------------------

def test_geometric_consistency_matches_loop(z):
    got = geometric_consistency(z["image"], z["text"]).item()
    assert got == pytest.approx(ref_gc(z["image"], z["text"]), rel=1e-12)
    assert GeometricConsistency()(z).item() == pytest.approx(got, rel=1e-14)
    # identical modalities are perfectly consistent
    assert geometric_consistency(z["image"], z["image"]).item() == pytest.approx(0.0, abs=1e-14)


def test_augmented_geometric_consistency_matches_loop(z):
    args = [z[k] for k in ("image", "text", "image_aug", "text_aug")]
    got = augmented_geometric_consistency(*args).item()
    assert got == pytest.approx(ref_gc_aug(*args), rel=1e-12)
    assert AugmentedGeometricConsistency()(z).item() == pytest.approx(got, rel=1e-14)
    # no text augmentation (text_aug is text): the skipped text part is exactly the general one
    same = augmented_geometric_consistency(z["image"], z["text"], z["image_aug"], z["text"]).item()
    cloned = augmented_geometric_consistency(z["image"], z["text"], z["image_aug"], z["text"].clone()).item()
    assert same == pytest.approx(ref_gc_aug(z["image"], z["text"], z["image_aug"], z["text"]), rel=1e-12)
    assert same == pytest.approx(cloned, rel=1e-14)
    assert augmented_geometric_consistency(*args[:2], *args[:2]).item() == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("t", [0.25, 0.0, 0.7, 1.0])
def test_brownian_bridge_fixed_t_matches_loop(z, t):
    got = brownian_bridge(z["image"], z["text"], z["image_aug"], t=t).item()
    assert got == pytest.approx(ref_bridge(z["image"], z["text"], z["image_aug"], [t] * N), rel=1e-12)


def test_brownian_bridge_default_t_and_endpoints(z):
    assert BrownianBridge().t == 0.25
    assert brownian_bridge(z["image"], z["text"], z["image_aug"]).item() == pytest.approx(
        ref_bridge(z["image"], z["text"], z["image_aug"], [0.25] * N), rel=1e-12)
    # t is the IMAGE weight: t = 1 puts the bridge point on the image, t = 0 on the text
    assert brownian_bridge(z["image"], z["text"], z["image"], t=1.0).item() == pytest.approx(0.0, abs=1e-14)
    assert brownian_bridge(z["image"], z["text"], z["text"], t=0.0).item() == pytest.approx(0.0, abs=1e-14)
    assert brownian_bridge(z["image"], z["text"], z["image"], t=0.0).item() > 0.1


def test_brownian_bridge_uniform_t_is_seeded_and_matches_loop(z):
    v, t, va = z["image"], z["text"], z["image_aug"]
    draws = torch.rand(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()
    got = brownian_bridge(v, t, va, t="uniform", generator=torch.Generator().manual_seed(7)).item()
    assert got == pytest.approx(ref_bridge(v, t, va, draws), rel=1e-12)
    # per-sample t really differs from any fixed t here, and the generator advances between calls
    assert got != pytest.approx(ref_bridge(v, t, va, [0.25] * N), rel=1e-6)
    term = BrownianBridge(t="uniform", seed=7)
    first, second = term(z).item(), term(z).item()
    assert first == pytest.approx(got, rel=1e-14)
    assert second != pytest.approx(first, rel=1e-6)
    more = torch.rand(2 * N, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()[N:]
    assert second == pytest.approx(ref_bridge(v, t, va, more), rel=1e-12)
    # float32 features use the same float64 draws
    got32 = brownian_bridge(v.float(), t.float(), va.float(), t="uniform", generator=torch.Generator().manual_seed(7))
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(got, rel=1e-5)


def test_brownian_bridge_is_minimised_on_the_bridge_unlike_the_misprint(z):
    v, t, tt = z["image"], z["text"], 0.25
    mu = F.normalize(tt * v + (1 - tt) * t, dim=-1)
    # a direction orthogonal to mu for each sample: walk z^a away from the bridge point
    perp = F.normalize(z["image_aug"] - (z["image_aug"] * mu).sum(-1, keepdim=True) * mu, dim=-1)
    angles = [0.0, 0.2, 0.5, 1.0, 2.0, math.pi]
    ours, misprint = [], []
    for a in angles:
        za = math.cos(a) * mu + math.sin(a) * perp
        ours.append(brownian_bridge(v, t, za, t=tt).item())
        misprint.append(misprinted_bridge(v, t, za, tt))
    assert ours[0] == pytest.approx(0.0, abs=1e-14)  # exactly on the bridge: zero loss
    assert all(b > a for a, b in zip(ours, ours[1:]))  # moving away only increases it
    assert ours[-1] == pytest.approx(4.0, rel=1e-12)  # antipode: ||za - mu||^2 = 4
    assert ours == pytest.approx([2 - 2 * math.cos(a) for a in angles], rel=1e-12, abs=1e-14)
    # the misprinted simplification: not zero on the bridge, and moving away DEcreases it
    assert misprint[0] > 0.5
    assert all(b < a for a, b in zip(misprint, misprint[1:]))
    assert min(misprint) < 0 < misprint[0]


def test_separation_orthogonality_matches_loop(z):
    got = SeparationOrthogonality()(z).item()
    assert got == pytest.approx(ref_ortho(z["image"], z["text"], z["image_ind"], z["text_ind"]), rel=1e-12)
    # orthogonal independent features give 0; identical ones the maximum 2
    e = torch.eye(D, dtype=torch.float64)
    feats = {"image": e[:1].expand(N, D), "text": e[1:2].expand(N, D),
             "image_ind": e[2:3].expand(N, D), "text_ind": e[3:4].expand(N, D)}
    assert SeparationOrthogonality()(feats).item() == 0.0
    assert SeparationOrthogonality()({**feats, "image_ind": feats["image"], "text_ind": feats["text"]}).item() == 2.0


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_separation_in_modal_contrast_matches_loop(z, temperature):
    got = SeparationInModalContrast(temperature=temperature)(z).item()
    ref = (ref_info_nce(z["image_ind"], z["image_aug_ind"], 1 / temperature)
           + ref_info_nce(z["text_ind"], z["text_aug_ind"], 1 / temperature)) / 2
    assert got == pytest.approx(ref, rel=1e-12)
    assert SeparationInModalContrast().temperature == 0.1


def test_separation_uniformity_matches_loop_and_keeps_the_diagonal(z):
    got = SeparationUniformity()(z).item()
    assert got == pytest.approx(ref_iuni(z["image_ind"], z["text_ind"]), rel=1e-12)
    # collapsed features: every pair (diagonal included) gives G = 1 per modality -> log(2 N^2 / N^2)
    same = unit(1, D, seed=3).expand(N, D)
    assert SeparationUniformity()({"image_ind": same, "text_ind": same}).item() == pytest.approx(math.log(2), rel=1e-14)
    # dropping the diagonal would give a different number
    iv, it = z["image_ind"], z["text_ind"]
    off = sum(math.exp(-2 * sqdist(a, b)) for x in (iv.tolist(), it.tolist())
              for j, a in enumerate(x) for k, b in enumerate(x) if j != k)
    assert got != pytest.approx(math.log(off / N ** 2), rel=1e-6)


@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_in_modal_contrastive_matches_loop(z, scale):
    s = torch.tensor(scale, dtype=torch.float64)
    got = in_modal_contrastive(z["image"], z["image_aug"], z["text"], z["text_aug"], s).item()
    ref = (ref_info_nce(z["image"], z["image_aug"], scale) + ref_info_nce(z["text"], z["text_aug"], scale)) / 2
    assert got == pytest.approx(ref, rel=1e-12)
    assert InModalContrastive()(z, logit_scale=s).item() == pytest.approx(got, rel=1e-14)
    term = InModalContrastive()
    batch = FeatureBatch({k: z[k] for k in term.keys}, logit_scale=s)
    assert term.finalize(term.statistics(batch)).item() == pytest.approx(got, rel=1e-14)


def test_independent_head():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        big = IndependentHead(256, 64, dtype=torch.float64)  # open_clip's proj init: std width ** -0.5
        head = IndependentHead(7, 3, dtype=torch.float64)
    assert big.proj.std().item() == pytest.approx(256 ** -0.5, rel=0.03)
    assert abs(big.proj.mean().item()) < 0.01
    assert tuple(head.proj.shape) == (7, 3)
    x = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = head(x)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(out, F.normalize(x @ head.proj, dim=-1))
    w = head.proj.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w_, x_: functional_call(head, {"proj": w_}, (x_,)),
                                    [w, x.clone().requires_grad_()])
    assert [n for n, _ in head.named_parameters()] == ["proj"]


# ---- gradcheck (float64, inputs through F.normalize) ---------------------------------------------

def _bridge_uniform(a, b, c):
    return brownian_bridge(a, b, c, t="uniform", generator=torch.Generator().manual_seed(3))


GRADCHECK = {
    "gc": (2, lambda a, b: geometric_consistency(a, b)),
    "gc_aug": (4, lambda a, b, c, d: augmented_geometric_consistency(a, b, c, d)),
    "gc_aug(text_aug=text)": (3, lambda a, b, c: augmented_geometric_consistency(a, b, c, b)),
    "bridge": (3, lambda a, b, c: brownian_bridge(a, b, c)),
    "bridge(uniform)": (3, _bridge_uniform),
    "sep_ortho": (4, lambda a, b, c, d: SeparationOrthogonality()([a, b, c, d])),
    "sep_icon": (4, lambda a, b, c, d: SeparationInModalContrast(0.5)([a, b, c, d])),
    "sep_iuni": (2, lambda a, b: SeparationUniformity()([a, b])),
}


@pytest.mark.parametrize("label", list(GRADCHECK))
def test_gradcheck(label):
    k, fn = GRADCHECK[label]
    xs = [torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(s), requires_grad=True)
          for s in range(k)]
    assert torch.autograd.gradcheck(lambda *a: fn(*(F.normalize(x, dim=-1) for x in a)), xs)


def test_gradcheck_inmodal_including_logit_scale():
    xs = [torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(s), requires_grad=True)
          for s in range(4)]
    log_scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)

    def fn(a, b, c, d, ls):
        return in_modal_contrastive(*(F.normalize(x, dim=-1) for x in (a, b, c, d)), ls.exp())

    assert torch.autograd.gradcheck(fn, xs + [log_scale])


# ---- bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_name_the_term(z):
    a, b = unit(4, 3, seed=0), unit(4, 2, seed=1)
    with pytest.raises(ValueError, match=r"\(gc\).*same shape"):
        geometric_consistency(a, b)
    with pytest.raises(ValueError, match=r"\(gc\)"):
        geometric_consistency(a, unit(5, 3, seed=1))
    with pytest.raises(ValueError, match=r"\(gc\)"):
        GeometricConsistency()({"image": a, "text": b})
    with pytest.raises(ValueError, match=r"\(gc\).*empty"):
        geometric_consistency(a[:0], a[:0])
    with pytest.raises(ValueError, match=r"\(gc_aug\)"):
        augmented_geometric_consistency(a, a, a.view(2, 2, 3), a)
    with pytest.raises(ValueError, match=r"\(bridge\)"):
        brownian_bridge(a, a, b)
    with pytest.raises(ValueError, match=r"bridge: t must be in \[0, 1\]"):
        brownian_bridge(a, a, a, t=1.5)
    with pytest.raises(ValueError, match=r"bridge: t must be"):
        BrownianBridge(t=-0.1)
    with pytest.raises(ValueError, match=r"bridge: t must be .* 'uniform'"):
        BrownianBridge(t="gaussian")
    with pytest.raises(ValueError, match="bridge: give either a generator or a seed"):
        BrownianBridge(t="uniform", generator=torch.Generator(), seed=1)
    with pytest.raises(ValueError, match=r"\(sep_ortho\)"):
        SeparationOrthogonality()({"image": a, "text": a, "image_ind": b, "text_ind": a})
    with pytest.raises(ValueError, match=r"\(sep_icon\)"):
        SeparationInModalContrast()({"image_ind": a, "image_aug_ind": b, "text_ind": a, "text_aug_ind": a})
    for bad in (0, -1.0, float("inf"), "warm"):
        with pytest.raises(ValueError, match="sep_icon: temperature"):
            SeparationInModalContrast(temperature=bad)
    with pytest.raises(ValueError, match="sep_iuni: missing embeddings"):
        SeparationUniformity()({"image_ind": a})
    with pytest.raises(ValueError, match=r"inmodal takes its temperature from the CLIP logit scale"):
        InModalContrastive()(z)
    term = InModalContrastive()
    with pytest.raises(ValueError, match=r"inmodal takes its temperature"):
        term.statistics(FeatureBatch({k: z[k] for k in term.keys}))
    with pytest.raises(ValueError, match=r"inmodal: logit_scale must be a scalar"):
        term(z, logit_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"\(inmodal\)"):
        in_modal_contrastive(a, b, a, a, torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"IndependentHead: expected pooled backbone features \[B, 6\]"):
        IndependentHead(6, 4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="IndependentHead"):
        IndependentHead(0, 4)


# ---- 1 vs 2 processes -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("structure_ddp") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(os.path.dirname(__file__), "structure_ddp_worker.py"), str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process_results():
    env_ws = os.environ.get("WORLD_SIZE")
    assert env_ws in (None, "1"), "run the test outside torchrun"
    return structure_ddp_worker.run()


@pytest.mark.slow
def test_terms_equal_over_1_and_2_processes(one_process_results, two_process_results):
    labels = list(structure_ddp_worker.make_terms())
    assert sorted(two_process_results) == sorted(one_process_results) == sorted(labels)
    failures = []
    for label in labels:
        one, two = one_process_results[label], two_process_results[label]
        value_diff = abs(two["value"] - one["value"])
        grad_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(two["grad"], one["grad"]))
        grad_size = max(float(np.max(np.abs(np.asarray(b)))) for b in one["grad"])
        print(f"{label:24s} value {one['value']:.6f}  |value diff| = {value_diff:.2e}  "
              f"max |grad diff| = {grad_diff:.2e}  (max |grad| {grad_size:.2e})")
        assert grad_size > 1e-3, label  # the term really has a gradient to compare
        if not (value_diff <= 1e-12 * max(1.0, abs(one["value"])) and grad_diff < 1e-12):
            failures.append(label)
    assert not failures, failures
