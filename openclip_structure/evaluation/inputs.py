"""Input handling shared by the measures (metrics, retrieval, diagnostics): validation of
embedding matrices and labels, L2 normalisation, and the block size that bounds the memory of
pairwise computations (one module attribute, so tests can shrink it to force many blocks).
"""
from __future__ import annotations

import numpy as np

# Upper bound on the elements of one block of the similarity matrix (float32: 128 MiB).
_BLOCK_ELEMENTS = 2**25


def _to_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        x = x.double() if str(x.dtype) == "torch.float64" else x.float()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    return x if x.dtype == np.float64 else x.astype(np.float32)


def _embeddings(x, name: str) -> np.ndarray:
    """Validate one embedding matrix and return it with L2-normalised rows."""
    x = _to_numpy(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, dim), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} contains a zero-norm row, which cannot be L2-normalised")
    return x / norms


def _paired(img, txt) -> tuple[np.ndarray, np.ndarray]:
    a = _embeddings(img, "img")
    b = _embeddings(txt, "txt")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"img and txt must have the same number of rows (pairs), got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"img and txt must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    return a, b


def _labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"labels must have one entry per embedding row ({n}), got {y.shape[0]}")
    return y


def _mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0, dtype=np.float64)
