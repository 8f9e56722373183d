"""Quintic Newton-Schulz orthogonalization (Moonlight's coefficients), batched over same-shape matrices."""

from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NORM_EPS = 1e-7


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U V^T of each (A, B) matrix in ``update`` (shape ``(A, B)`` or ``(N, A, B)``).

    The iteration runs on the wide orientation (tall matrices are transposed, made contiguous so
    the matmuls stay fast), after scaling each matrix to unit Frobenius norm. Returns float32.
    """
    if update.ndim not in (2, 3):
        raise ValueError(f"orthogonalize takes (A, B) or (N, A, B) matrices, got shape {tuple(update.shape)}")
    x = update if update.ndim == 3 else update.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x.float()
    x = (x / (frobenius_norm(x) + NORM_EPS)).to(dtype).contiguous()
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)
    if tall:
        x = x.mT
    x = x.float()
    return x if update.ndim == 3 else x.squeeze(0)


def frobenius_norm(x: torch.Tensor) -> torch.Tensor:
    """Each matrix's Frobenius norm (keepdim), computed on ``x / max|x|`` so that the sum of squares of a
    finite but huge matrix (entries of 1e18 and more) does not overflow float32 to inf."""
    peak = x.abs().amax(dim=(-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.linalg.matrix_norm(x / peak, keepdim=True) * peak


def ns_flops(shape: tuple[int, int], steps: int = 5) -> int:
    """Matmul FLOPs of :func:`orthogonalize` on one matrix: per step X X^T, G G and P X."""
    m, n = sorted(shape)
    return steps * 2 * (2 * m * m * n + m * m * m)
