"""Fused forward/backward kernels of the pairwise sums the terms need (pure torch, any device).

Each one builds at most ONE ``B_local x B_global`` matrix, keeps it for backward and allocates no
other matrix of that size in backward (autograd's generic graph would keep or allocate 2-4 of
them and make 2-3 more passes over memory). Gradients are exact; they are checked against
autograd of the plain formulas in the tests (``gradcheck``) and against double loops.

``symmetric=True`` is for sums over ALL ordered pairs (j, k) of a symmetric pair function
``f(x_j, x_k) = f(x_k, x_j)`` of ONE set of samples, with ``rows`` the local part and ``cols``
all of them: then ``d/dx_j sum_{j,k} f = 2 sum_k d1 f(x_j, x_k)``, so the gradient is taken
through ``rows`` only, doubled, and ``cols`` gets none (one matmul less in backward and, under data
parallelism, no gradient through the gather: every process computes its own rows' full gradient).
The callers guarantee the symmetry; with ``rows`` not a slice of ``cols`` the result is wrong.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable


class _ExpKernelSum(torch.autograd.Function):
    """sum_{j, k != diag_j} exp(a <r_j, c_k> + b)  (a, b Python floats)."""

    @staticmethod
    def forward(ctx, rows, cols, diag, a: float, b: float, symmetric: bool):
        k = torch.addmm(rows.new_full((), b), rows, cols.t(), alpha=a).exp_()
        total = k.sum() - k.gather(1, diag.view(-1, 1)).sum()
        ctx.save_for_backward(rows, cols, diag, k)
        ctx.a, ctx.symmetric = a, symmetric
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        rows, cols, diag, k = ctx.saved_tensors
        a = g * ctx.a
        grad_rows = grad_cols = None
        with _without_own_terms(k, diag, lambda own: torch.zeros_like(own)):  # d/dK = 1 off the own pairs
            if ctx.needs_input_grad[0]:
                grad_rows = torch.mm(k, cols).mul_(2 * a if ctx.symmetric else a)
            if ctx.needs_input_grad[1] and not ctx.symmetric:
                grad_cols = torch.mm(k.t(), rows).mul_(a)
        return grad_rows, grad_cols, None, None, None, None


class _without_own_terms:
    """Temporarily replace the own-pair entries ``m[j, diag[j]]`` of a saved matrix, restored
    bit-exactly afterwards: lets one matmul apply "matrix minus own-pair part" without a second
    ``B_local x B_global`` matrix. Works on ``m.data`` (same storage, untracked version counter):
    the values autograd saved are unchanged once the block exits, so a retained graph can run
    backward again (``retain_graph=True``, gradcheck)."""

    def __init__(self, m: torch.Tensor, diag: torch.Tensor, replace):
        self.m, self.idx, self.replace = m.data, diag.view(-1, 1), replace

    def __enter__(self):
        self.own = self.m.gather(1, self.idx)
        self.m.scatter_(1, self.idx, self.replace(self.own))
        return self.m

    def __exit__(self, *exc):
        self.m.scatter_(1, self.idx, self.own)
        return False


def exp_kernel_sum(rows: torch.Tensor, cols: torch.Tensor, diag: torch.Tensor, a: float, b: float,
                   symmetric: bool = False) -> torch.Tensor:
    """``sum_j sum_{k != diag[j]} exp(a <rows_j, cols_k> + b)``; one ``B_local x B_global`` matrix."""
    if symmetric:
        cols = cols.detach()
    return _ExpKernelSum.apply(rows, cols, diag, float(a), float(b), bool(symmetric))


class _InfoNCESum(torch.autograd.Function):
    """sum_j [ logsumexp_k <r_j, c_k> - <r_j, c_diag_j> ] (rows already carry the scale)."""

    @staticmethod
    def forward(ctx, rows, cols, diag):
        e = torch.mm(rows, cols.t())
        own = e.gather(1, diag.view(-1, 1))
        m = e.amax(dim=1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # inf/nan logits stay visible
        e.sub_(m).exp_()
        s = e.sum(dim=1, keepdim=True)
        ctx.save_for_backward(rows, cols, diag, e, s)
        return (m + s.log() - own).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        rows, cols, diag, e, s = ctx.saved_tensors  # softmax = e / s; d/dlogits = softmax - one-hot
        grad_rows = grad_cols = None
        inv = g / s
        with _without_own_terms(e, diag, lambda own: own - s):  # e - s * one-hot
            if ctx.needs_input_grad[0]:
                grad_rows = torch.mm(e, cols).mul_(inv)
            if ctx.needs_input_grad[1]:
                grad_cols = torch.mm(e.t(), rows * inv)
        return grad_rows, grad_cols, None


def info_nce_sum(rows: torch.Tensor, cols: torch.Tensor, diag: torch.Tensor,
                 scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """sum_i -log softmax_k(scale <rows_i, cols_k>)[diag_i]; the scale multiplies the small
    ``rows`` (its gradient flows through that product), one ``B_local x B_global`` matrix."""
    return _InfoNCESum.apply(rows * scale, cols, diag)


class _SquaredProductNorm(torch.autograd.Function):
    """|| R C^T ||_F^2."""

    @staticmethod
    def forward(ctx, rows, cols, symmetric: bool):
        x = torch.mm(rows, cols.t())
        flat = x.view(-1)
        ctx.save_for_backward(rows, cols, x)
        ctx.symmetric = symmetric
        return torch.dot(flat, flat)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        rows, cols, x = ctx.saved_tensors
        grad_rows = grad_cols = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.mm(x, cols).mul_(4 * g if ctx.symmetric else 2 * g)
        if ctx.needs_input_grad[1] and not ctx.symmetric:
            grad_cols = torch.mm(x.t(), rows).mul_(2 * g)
        return grad_rows, grad_cols, None


def squared_product_norm(rows: torch.Tensor, cols: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """``sum_{j, k} <rows_j, cols_k>^2``; one ``B_local x B_global`` matrix. ``symmetric``: see
    the module docstring (the caller guarantees ``<rows_j, cols_k>^2`` summed over the global batch
    is a symmetric pair function)."""
    if symmetric:
        cols = cols.detach()
    return _SquaredProductNorm.apply(rows, cols, bool(symmetric))


class _Gram(torch.autograd.Function):
    """X^T X, backward X (G + G^T): one matmul instead of autograd's two (twice differentiable)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.mm(x.t(), x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.mm(x, g + g.t())


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` (``[D, D]``) of ``x`` ``[B, D]``: a sum over rows, so it is a valid statistic."""
    return _Gram.apply(x)


def use_gram_form(n_global: int, n_local: int, dim: int, override: Optional[str] = None,
                  crossover: float = 2.0, overhead_rows: float = 256.0) -> bool:
    """Whether the O(B_local D^2) Gram form of a quadratic pair sum is used rather than the
    O(B_local B_global D) pairwise form: ``override`` ("gram"/"pairwise") or, by default, when
    ``B_global >= D * (crossover + overhead_rows / B_local)``, where it is the cheaper one. The
    Gram form costs ~B_local D^2 multiply-adds per Gram matrix plus O(D^2) for the statistics (the
    all-reduce, the finalisation), the pairwise one ~B_local B_global D; the constants are the
    crossovers measured on CPU (scripts/bench_losses.py, docs/performance.md). The decision only
    depends on sizes that are equal on every process."""
    if override in ("gram", "pairwise"):
        return override == "gram"
    return n_global >= dim * (crossover + overhead_rows / max(n_local, 1))
