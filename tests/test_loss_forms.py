"""The fast computation paths of the regularizers (docs/performance.md): the Gram (D x D) and the
pairwise forms of geometric consistency give the same values and gradients as the plain formulas,
the fused kernels' backward passes equal autograd's, and the symmetric-gradient shortcut stays
exact when the batch is split over simulated processes."""
import math

import pytest
import torch
import torch.nn.functional as F

import openclip_structure.losses.runtime as osd
from openclip_structure.losses.runtime import FeatureBatch
from openclip_structure.losses import (AugmentedGeometricConsistency, CentroidUniformity, GeometricConsistency,
                                       InModalContrastive, ModalityUniformity, SeparationInModalContrast,
                                       SeparationUniformity)
from openclip_structure.losses._fused import (exp_kernel_sum, gram, info_nce_sum, squared_product_norm,
                                              use_gram_form)


def unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


# ---- plain (autograd, batch x batch) formulas ---------------------------------------------------

def plain_gc(v, t):
    n = v.shape[0]
    cross = v @ t.t() - t @ v.t()
    inm = v @ v.t() - t @ t.t()
    return ((cross ** 2).sum() + (inm ** 2).sum()) / n


def plain_gc_aug(v, t, va, ta):
    n = v.shape[0]
    s = ((v @ v.t() - va @ va.t()) ** 2).sum() + ((t @ t.t() - ta @ ta.t()) ** 2).sum()
    s = s + (((v * t).sum(-1) - (va * ta).sum(-1)) ** 2).sum()
    return s / n


FORMS = ["pairwise", "gram"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n,d", [(7, 3), (5, 9)])
def test_gc_forms_match_plain_formula_value_and_gradient(form, n, d):
    xs = [torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(s), requires_grad=True)
          for s in range(2)]
    v, t = (F.normalize(x, dim=-1) for x in xs)
    got = GeometricConsistency(form=form)({"image": v, "text": t})
    ref = plain_gc(v, t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    g_got = torch.autograd.grad(got, xs, retain_graph=True)
    g_ref = torch.autograd.grad(ref, xs)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: GeometricConsistency(form=form)([F.normalize(a, dim=-1), F.normalize(b, dim=-1)]), xs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("text_aug", [True, False])
def test_gc_aug_forms_match_plain_formula_value_and_gradient(form, text_aug):
    n, d = 6, 4
    xs = [torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + s), requires_grad=True)
          for s in range(4)]
    v, t, va, ta = (F.normalize(x, dim=-1) for x in xs)
    if not text_aug:
        ta = t
    feats = {"image": v, "text": t, "image_aug": va, "text_aug": ta}
    got = AugmentedGeometricConsistency(form=form)(feats)
    ref = plain_gc_aug(v, t, va, ta)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    used = xs if text_aug else xs[:3]
    for a, b in zip(torch.autograd.grad(got, used, retain_graph=True), torch.autograd.grad(ref, used)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def fn(*a):
        z = [F.normalize(x, dim=-1) for x in a]
        if not text_aug:
            z.append(z[1])
        return AugmentedGeometricConsistency(form=form)(dict(zip(("image", "text", "image_aug", "text_aug"), z)))

    assert torch.autograd.gradcheck(fn, used)


def test_gram_form_is_exact_zero_for_identical_views_and_close_in_float32():
    v, t = unit(300, 16, 0, torch.float32), unit(300, 16, 1, torch.float32)
    for form in FORMS:
        assert GeometricConsistency(form=form)({"image": v, "text": v}).item() == 0.0
        assert AugmentedGeometricConsistency(form=form)(
            {"image": v, "text": t, "image_aug": v, "text_aug": t}).item() == 0.0
    # float32: both forms agree with the float64 formula to float32 accuracy
    ref = plain_gc(v.double(), t.double()).item()
    for form in FORMS:
        assert GeometricConsistency(form=form)({"image": v, "text": t}).item() == pytest.approx(ref, rel=1e-5)


def test_auto_form_switches_at_the_crossover():
    assert use_gram_form(4096, 1024, 512) and not use_gram_form(512, 512, 512)
    # B_global >= D (crossover + overhead_rows / B_local)
    assert use_gram_form(1024, 512, 512, crossover=1.5, overhead_rows=256)
    assert not use_gram_form(1023, 512, 512, crossover=1.5, overhead_rows=256)
    assert not use_gram_form(1024, 256, 512, crossover=1.5, overhead_rows=256)
    assert use_gram_form(8, 8, 512, "gram") and not use_gram_form(10 ** 6, 10 ** 5, 4, "pairwise")
    with pytest.raises(ValueError, match="gc: form must be one of"):
        GeometricConsistency(form="fast")
    # statistics sizes: pairwise 2 / 4 numbers, Gram 2 D^2 + 1 / 3 D^2 (+3 D^2) + 2
    z = {k: unit(400, 3, s) for s, k in enumerate(("image", "text", "image_aug", "text_aug"))}
    assert GeometricConsistency()(z).item() == pytest.approx(GeometricConsistency(form="pairwise")(z).item(), rel=1e-12)
    b = FeatureBatch(z)
    assert GeometricConsistency().statistics(b).numel() == 2 * 9 + 1
    assert AugmentedGeometricConsistency().statistics(b).numel() == 6 * 9 + 2
    assert AugmentedGeometricConsistency().statistics(FeatureBatch({**z, "text_aug": z["text"]})).numel() == 3 * 9 + 2
    assert AugmentedGeometricConsistency(form="pairwise").statistics(b).numel() == 4


# ---- fused kernels against autograd of the plain expressions ----------------------------------

def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(*s, dtype=torch.float64, generator=g), dim=-1).requires_grad_() for s in shapes]


def test_exp_kernel_sum_matches_autograd():
    rows, cols = _leaves((4, 3), (9, 3))
    diag = torch.tensor([2, 0, 7, 5])
    got = exp_kernel_sum(rows, cols, diag, 3.0, -1.5)
    k = torch.exp(3.0 * rows @ cols.t() - 1.5)
    ref = k.sum() - k.gather(1, diag.view(-1, 1)).sum()
    assert got.item() == pytest.approx(ref.item(), rel=1e-13)
    for a, b in zip(torch.autograd.grad(got, [rows, cols]), torch.autograd.grad(ref, [rows, cols])):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda r, c: exp_kernel_sum(r, c, diag, 3.0, -1.5), [rows, cols])


def test_info_nce_sum_matches_autograd_including_scale():
    rows, cols = _leaves((4, 3), (9, 3), seed=1)
    diag = torch.tensor([2, 0, 7, 5])
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    got = info_nce_sum(rows, cols, diag, scale)
    logits = scale * rows @ cols.t()
    ref = F.cross_entropy(logits, diag, reduction="sum")
    assert got.item() == pytest.approx(ref.item(), rel=1e-13)
    for a, b in zip(torch.autograd.grad(got, [rows, cols, scale]), torch.autograd.grad(ref, [rows, cols, scale])):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda r, c, s: info_nce_sum(r, c, diag, s), [rows, cols, scale])
    # large logits stay finite (max subtraction)
    big = info_nce_sum(rows.detach(), cols.detach(), diag, 1e4)
    assert torch.isfinite(big)


def test_squared_product_norm_and_gram_match_autograd():
    rows, cols = _leaves((4, 3), (9, 3), seed=2)
    got = squared_product_norm(rows, cols)
    ref = ((rows @ cols.t()) ** 2).sum()
    assert got.item() == pytest.approx(ref.item(), rel=1e-13)
    for a, b in zip(torch.autograd.grad(got, [rows, cols]), torch.autograd.grad(ref, [rows, cols])):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda r, c: squared_product_norm(r, c), [rows, cols])
    x = _leaves((6, 3), seed=3)[0]
    assert torch.autograd.gradcheck(gram, [x])
    assert torch.autograd.gradgradcheck(gram, [x])


def test_symmetric_shortcut_equals_the_full_gradient():
    (x,) = _leaves((7, 3), seed=4)
    diag = torch.arange(7)
    full = exp_kernel_sum(x, x, diag, 4.0, -4.0)
    sym = exp_kernel_sum(x, x, diag, 4.0, -4.0, symmetric=True)
    assert sym.item() == full.item()
    torch.testing.assert_close(torch.autograd.grad(sym, x)[0], torch.autograd.grad(full, x)[0])
    full = squared_product_norm(x, x)
    sym = squared_product_norm(x, x, symmetric=True)
    torch.testing.assert_close(torch.autograd.grad(sym, x)[0], torch.autograd.grad(full, x)[0])


# ---- split over simulated processes: sum of per-rank statistics, gradient through everything ----

TERMS = {
    "gc(pairwise)": (lambda: GeometricConsistency(form="pairwise"), None),
    "gc(gram)": (lambda: GeometricConsistency(form="gram"), None),
    "gc_aug(pairwise)": (lambda: AugmentedGeometricConsistency(form="pairwise"), None),
    "gc_aug(pairwise, no text aug)": (lambda: AugmentedGeometricConsistency(form="pairwise"), "text"),
    "gc_aug(gram)": (lambda: AugmentedGeometricConsistency(form="gram"), None),
    "gap_cu": (lambda: CentroidUniformity(), None),
    "gap_cu(modality)": (lambda: ModalityUniformity(), None),
    "sep_iuni": (lambda: SeparationUniformity(), None),
    "sep_icon": (lambda: SeparationInModalContrast(0.3), None),
    "inmodal": (lambda: InModalContrastive(), None),
}


@pytest.mark.parametrize("label", list(TERMS))
def test_split_batch_equals_one_process(label, monkeypatch):
    """Each simulated rank sees its rows plus the whole batch as gathered columns (with gradient,
    as torch.distributed.nn's gather); the statistics are summed over ranks. Value and gradient
    must equal the single-process ones: this checks the local-rows/Gram statistics and the
    symmetric shortcut (rows get the whole gradient, the columns none)."""
    make, alias = TERMS[label]
    n, d, world = 12, 5, 3
    keys = ["image", "text", "image_aug", "text_aug", "image_ind", "text_ind", "image_aug_ind", "text_aug_ind"]
    x = {k: torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(30 + i), requires_grad=True)
         for i, k in enumerate(keys)}
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)

    def feats():
        z = {k: F.normalize(v, dim=-1) for k, v in x.items()}
        if alias:
            z["text_aug"] = z[alias]
        return z

    term = make()
    leaves = list(x.values()) + [scale]
    z = feats()
    one = term.finalize(term.statistics(FeatureBatch({k: z[k] for k in term.keys}, logit_scale=scale)))
    g_one = torch.autograd.grad(one, leaves, allow_unused=True)

    z = feats()
    full = {}
    monkeypatch.setattr(osd, "_gather_with_grad", lambda t: full[id(t)])
    b = n // world
    stats, keep = [], []
    for rank in range(world):
        local = {}
        keep.append(local)  # ids stay unique while the simulated gathers look them up
        for k in term.keys:
            if k == "text_aug" and alias:
                local[k] = local["text"]
                continue
            local[k] = z[k][rank * b:(rank + 1) * b]
            full[id(local[k])] = z[k]
        stats.append(term.statistics(FeatureBatch(local, rank, world, logit_scale=scale)))
    split = term.finalize(torch.stack(stats).sum(0))
    assert split.item() == pytest.approx(one.item(), rel=1e-12)
    g_split = torch.autograd.grad(split, leaves, allow_unused=True)
    for a, b_ in zip(g_split, g_one):
        if b_ is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-13)
    assert math.isfinite(one.item())


def test_terms_sharing_one_batch_keep_the_gather_gradient(monkeypatch):
    """All terms read ONE FeatureBatch per simulated rank (one cached gather per key, as
    StructureLoss does). The simulated gather is an autograd op like torch.distributed.nn's, so a
    term that first touched a key under no_grad would cache a gradient-less gather for the others:
    the summed loss must still have the single-process gradient."""
    n, d, world = 12, 5, 3
    keys = ["image", "text", "image_aug", "text_aug", "image_ind", "text_ind", "image_aug_ind", "text_aug_ind"]
    x = {k: torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(50 + i), requires_grad=True)
         for i, k in enumerate(keys)}
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    # no-grad users of a key first (gap_cu, gc_aug pairwise), then terms that need its gradient
    terms = [CentroidUniformity(), AugmentedGeometricConsistency(form="pairwise"), GeometricConsistency(form="pairwise"),
             InModalContrastive(), SeparationInModalContrast(0.3), SeparationUniformity(), ModalityUniformity()]
    leaves = list(x.values()) + [scale]

    def total(values):
        return sum(values)

    z = {k: F.normalize(v, dim=-1) for k, v in x.items()}
    one = total(t.finalize(t.statistics(FeatureBatch(z, logit_scale=scale))) for t in terms)
    g_one = torch.autograd.grad(one, leaves)

    z = {k: F.normalize(v, dim=-1) for k, v in x.items()}
    b = n // world
    owner = {}

    def gather(t):  # differentiable, and gradient-less under no_grad, like the real gather
        key = owner[id(t)]
        return torch.cat([z[key][:key_rank[id(t)] * b] * 1.0, t, z[key][(key_rank[id(t)] + 1) * b:] * 1.0])

    key_rank = {}
    monkeypatch.setattr(osd, "_gather_with_grad", gather)
    per_term = [[] for _ in terms]
    keep = []
    for rank in range(world):
        local = {k: z[k][rank * b:(rank + 1) * b] for k in keys}
        keep.append(local)
        for k, v in local.items():
            owner[id(v)], key_rank[id(v)] = k, rank
        batch = FeatureBatch(local, rank, world, logit_scale=scale)
        for i, t in enumerate(terms):
            per_term[i].append(t.statistics(batch))
    split = total(t.finalize(torch.stack(s).sum(0)) for t, s in zip(terms, per_term))
    assert split.item() == pytest.approx(one.item(), rel=1e-12)
    for a, b_ in zip(torch.autograd.grad(split, leaves), g_one):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-13)
