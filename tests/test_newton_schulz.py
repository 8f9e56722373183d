"""Newton-Schulz: orthogonalizes, batches exactly, handles tall matrices, and counts its FLOPs."""

import torch

from muon_ds.newton_schulz import ns_flops, orthogonalize


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
