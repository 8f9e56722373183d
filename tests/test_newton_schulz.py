"""Newton-Schulz: orthogonalizes, batches exactly, handles tall matrices, and counts its FLOPs."""

import pytest
import torch

from muon_ds.newton_schulz import POLAR_EXPRESS, coefficients, newton_schulz_, normalize_, ns_flops, orthogonalize
from muon_ds.optim import Muon


def test_singular_values_are_pushed_towards_one() -> None:
    g = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g, dtype=torch.float32))
    assert 0.6 < float(s.min()) and float(s.max()) < 1.25  # Moonlight's quintic: about [0.68, 1.13]
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = torch.nn.functional.cosine_similarity(orthogonalize(g, dtype=torch.float32).flatten(),
                                                   (u @ vh).flatten(), dim=0)
    assert cosine > 0.98  # the direction of U V^T


def test_batched_equals_one_at_a_time() -> None:
    g = torch.randn(5, 24, 40, generator=torch.Generator().manual_seed(1))
    batched = orthogonalize(g, dtype=torch.float32)
    single = torch.stack([orthogonalize(m, dtype=torch.float32) for m in g])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_tall_matrix_is_the_transpose_of_the_wide_one() -> None:
    g = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(orthogonalize(g, dtype=torch.float32), orthogonalize(g.T, dtype=torch.float32).T)


def test_bfloat16_stays_close_to_float32() -> None:
    g = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    low, high = orthogonalize(g, dtype=torch.bfloat16), orthogonalize(g, dtype=torch.float32)
    assert low.dtype == torch.float32
    assert float((low - high).norm() / high.norm()) < 0.05


def test_flops_match_the_matmuls() -> None:
    m, n = 24, 40  # per step: (m x n)(n x m), (m x m)(m x m), (m x m)(m x n), 2 FLOPs per multiply-add
    assert ns_flops((n, m), steps=5) == 5 * (2 * m * n * m + 2 * m * m * m + 2 * m * m * n)
    assert ns_flops((m, n)) == ns_flops((n, m))


def reference64(g: torch.Tensor, coefficients: list, safety: float = 1.0) -> torch.Tensor:
    """The quintic iteration in float64 on the wide orientation, written from its definition."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (safety * x.norm() + 1e-7)
    for a, b, c in coefficients:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("name,coefficients,safety", [("moonlight", [(3.4445, -4.7750, 2.0315)] * 5, 1.0),
                                                      ("polar_express", list(POLAR_EXPRESS[:5]), 1.01)])
def test_in_place_iteration_equals_the_float64_reference(shape: tuple, name: str, coefficients: list,
                                                         safety: float) -> None:
    """Tall matrices iterate as X <- aX + X P (no transposed copy): the same math as the wide form."""
    g = torch.randn(3, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for method in ("direct", "gram"):
        got = newton_schulz_(g.clone(), 5, name, method)
        for i in range(3):
            torch.testing.assert_close(got[i], reference64(g[i], coefficients, safety), rtol=1e-9, atol=1e-11)
        low = newton_schulz_(g.float(), 5, name, method).double()
        assert float((low - got).norm() / got.norm()) < 1e-4


def test_polar_express_coefficients_are_the_published_ones() -> None:
    """Amsel et al., Algorithm 1: the first and last published polynomials, the safety factor applied to all
    but the last; steps past the table repeat the last one."""
    assert POLAR_EXPRESS[0] == (8.28721201814563 / 1.01, -23.595886519098837 / 1.01**3, 17.300387312530933 / 1.01**5)
    assert POLAR_EXPRESS[-1] == (1.875, -1.25, 0.375) and len(POLAR_EXPRESS) == 8
    assert coefficients("polar_express", 10)[8:] == [(1.875, -1.25, 0.375)] * 2


def test_polar_express_is_closer_to_the_polar_factor() -> None:
    """Same FLOPs; after 5 steps the singular values are nearer 1 and the update nearer U V^T (float64)."""
    g = torch.randn(64, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    errors, spreads = {}, {}
    for name in ("moonlight", "polar_express"):
        o = newton_schulz_(g[None].clone(), 5, name)[0]
        errors[name] = float((o - u @ vh).norm() / (u @ vh).norm())
        s = torch.linalg.svdvals(o)
        spreads[name] = float((s - 1).abs().max())
    assert errors["polar_express"] < 0.5 * errors["moonlight"], errors
    assert spreads["polar_express"] < spreads["moonlight"], spreads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e18, 1e30, 3e38])
def test_huge_finite_matrix_is_normalized(scale: float, dtype: torch.dtype) -> None:
    """Finite entries whose float32 squares overflow (up to float32's largest) are normalized, not zeroed."""
    g = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(5))
    g = g / g.abs().amax()  # entries in [-1, 1]: times ``scale``, still finite
    got, expected = normalize_((g * scale).to(dtype), 1.0), normalize_(g.to(dtype), 1.0)
    error = float((got.float() - expected.float()).norm() / expected.float().norm())
    assert error < (0.01 if dtype == torch.bfloat16 else 1e-6), error  # zeroed: 1.0
    torch.testing.assert_close(orthogonalize(g * scale, dtype=torch.float32), orthogonalize(g, dtype=torch.float32))


def test_polar_express_is_a_muon_option() -> None:
    p = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(6)))
    start = p.detach().clone()
    opt = Muon([("w", p)], lr=0.1, ns_dtype="float32", ns_coefficients="polar_express", momentum=0.0)
    p.grad = torch.randn(24, 40, generator=torch.Generator().manual_seed(7))
    opt.step()
    expected = -0.1 * 0.2 * 40 ** 0.5 * reference64(p.grad, list(POLAR_EXPRESS[:5]), 1.01).float()
    torch.testing.assert_close(p.detach() - start, expected, rtol=1e-4, atol=1e-6)


def test_gram_space_trade_off_in_bfloat16() -> None:
    """Gram-space NS (fewer FLOPs on wide matrices) drifts further from the float64 iteration in bf16."""
    g = torch.randn(4, 32, 128, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    exact = newton_schulz_(g.clone(), 5)
    errors = {m: float((newton_schulz_(g.bfloat16(), 5, method=m).double() - exact).norm() / exact.norm())
              for m in ("direct", "gram")}
    assert errors["direct"] < 0.03 and errors["direct"] < errors["gram"] < 0.1, errors  # 0.018, 0.045
