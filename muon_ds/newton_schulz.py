"""Quintic Newton-Schulz orthogonalization, batched over same-shape matrices.

The default is Moonlight's iteration, the same coefficients every step. ``polar_express`` uses the
per-step coefficients of Polar Express (Amsel et al., arXiv 2505.16932, with its safety factor 1.01):
the same FLOPs, singular values much closer to 1 after 5 steps (see tests/test_newton_schulz.py).
"""

from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NORM_EPS = 1e-7
# Any finite float32 entry times this squares to under 1e17: sums of up to 1e21 of them stay finite.
OVERFLOW_SCALE = 2.0**-100
POLAR_EXPRESS_SAFETY = 1.01  # the paper's safety factor: rounding must not push a singular value past 1
# Polar Express's published degree-5 polynomials (a, b, c) of steps 1..8 (Amsel et al., Algorithm 1); later
# steps repeat the last. Each but the last is shrunk by the safety factor (a / s, b / s^3, c / s^5), as the
# paper does, and the input is scaled to norm 1 / s.
_POLAR_EXPRESS_PUBLISHED = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS = tuple((a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
                      for a, b, c in _POLAR_EXPRESS_PUBLISHED[:-1]) + _POLAR_EXPRESS_PUBLISHED[-1:]
COEFFICIENT_SETS = ("moonlight", "polar_express")
NS_METHODS = ("direct", "gram")


def coefficients(name: str, steps: int) -> list[tuple[float, float, float]]:
    if name == "moonlight":
        return [NS_COEFFICIENTS] * steps
    if name == "polar_express":
        return [POLAR_EXPRESS[min(i, len(POLAR_EXPRESS) - 1)] for i in range(steps)]
    raise ValueError(f"unknown Newton-Schulz coefficients {name!r}; valid: {list(COEFFICIENT_SETS)}")


def normalize_(x: torch.Tensor, safety: float = 1.0) -> torch.Tensor:
    """x <- x / (safety ||x||_F + eps) per matrix, in place and in x's dtype, with no temporary of x's size.

    The norm accumulates in float32 inside the reduction. A finite matrix whose sum of squares overflows
    there (entries of about 1e18 and more) is first scaled by 2^-100 (exact: only exponents change), so it
    is normalized, not zeroed. The norm comes out in x's dtype (for bf16 within 0.4% of the float32 norm,
    a uniform factor below the iteration's own rounding): dividing by a float32 norm would make float32
    copies of the batch.
    """
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    scale = torch.where(norm.isinf(), OVERFLOW_SCALE, 1.0).float()
    x.mul_(scale.to(x.dtype))
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    return x.div_((norm * safety + NORM_EPS * scale).to(x.dtype))


def newton_schulz_(x: torch.Tensor, steps: int = 5, coefficient_set: str = "moonlight",
                   method: str = "direct") -> torch.Tensor:
    """Orthogonalize the (N, A, B) batch ``x`` in its own dtype; ``x`` is overwritten (normalized, then
    used as one of two ping-pong buffers) and the result, ``x`` or a second buffer, is returned.

    Tall matrices iterate as X <- aX + X (bG + cG^2) with G = X^T X: the transpose of the wide iteration,
    without a transposed copy. ``method="gram"``: :func:`_iterate_gram`.
    """
    normalize_(x, _safety(coefficient_set))
    if method == "gram":
        return _iterate_gram(x, steps, coefficient_set)
    if method != "direct":
        raise ValueError(f"unknown Newton-Schulz method {method!r}; valid: {list(NS_METHODS)}")
    return _iterate(x, steps, coefficient_set)


def _iterate_gram(x: torch.Tensor, steps: int, coefficient_set: str) -> torch.Tensor:
    """The same iteration in Gram space: every iterate is Q X0 (wide; X0 Q^T tall) with Q small (m x m,
    m = min(A, B)), so the steps need only m x m products: Q <- p(Q G0 Q^T) Q, G0 = X0 X0^T.

    Per matrix, 4 m^2 n + 8 m^3 x steps FLOPs instead of (4 m^2 n + 2 m^3) x steps: fewer from an aspect
    ratio n / m of about 2 on (5 steps: 56 vs 90 m^3 at n = 4m). Rounding errors of Q compound over the
    steps, so it is further from the direct iteration in bf16 (see tests/test_newton_schulz.py).
    """
    tall = x.size(-2) > x.size(-1)
    gram = torch.bmm(x.mT, x) if tall else torch.bmm(x, x.mT)
    eye = torch.eye(gram.size(-1), dtype=x.dtype, device=x.device).expand_as(gram)
    q = eye.clone()
    for a, b, c in coefficients(coefficient_set, steps):
        r = torch.bmm(torch.bmm(q, gram), q.mT)
        poly = torch.baddbmm(r, r, r, beta=b, alpha=c).add_(eye, alpha=a)
        q = torch.bmm(poly, q)
    return torch.bmm(x, q.mT) if tall else torch.bmm(q, x)


def _safety(coefficient_set: str) -> float:
    return POLAR_EXPRESS_SAFETY if coefficient_set == "polar_express" else 1.0


def _iterate(x: torch.Tensor, steps: int, coefficient_set: str) -> torch.Tensor:
    """Two buffers of x's size and one of G's: G (at most x's size) lives in the buffer the step writes
    next, which it is no longer needed by when that write happens."""
    tall = x.size(-2) > x.size(-1)
    side = x.size(-1) if tall else x.size(-2)
    x = x.contiguous()
    poly = x.new_empty(x.size(0), side, side)
    other = torch.empty_like(x)
    for a, b, c in coefficients(coefficient_set, steps):
        gram = other.view(-1)[:poly.numel()].view_as(poly)
        torch.bmm(x.mT, x, out=gram) if tall else torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
        if tall:
            torch.baddbmm(x, x, poly, beta=a, alpha=1.0, out=other)
        else:
            torch.baddbmm(x, poly, x, beta=a, alpha=1.0, out=other)
        x, other = other, x
    return x


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  coefficient_set: str = "moonlight") -> torch.Tensor:
    """Approximate U V^T of each (A, B) matrix in ``update`` (shape ``(A, B)`` or ``(N, A, B)``): normalized
    in float32, iterated in ``dtype``, on a copy; returns float32."""
    if update.ndim not in (2, 3):
        raise ValueError(f"orthogonalize takes (A, B) or (N, A, B) matrices, got shape {tuple(update.shape)}")
    x = normalize_(update.to(torch.promote_types(update.dtype, torch.float32), copy=True), _safety(coefficient_set))
    x = x if update.ndim == 3 else x.unsqueeze(0)
    out = _iterate(x.to(dtype), steps, coefficient_set).float()
    return out if update.ndim == 3 else out.squeeze(0)


def ns_flops(shape: tuple[int, int], steps: int = 5) -> int:
    """Matmul FLOPs of :func:`orthogonalize` on one matrix: per step X X^T, G G and P X."""
    m, n = sorted(shape)
    return steps * 2 * (2 * m * m * n + m * m * m)
