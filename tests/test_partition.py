"""Per-parameter partitions (ZeRO-3): where each piece lies, who owns what, and what moves."""

import math

import torch

from muon_ds.matrices import by_dimensions
from muon_ds.newton_schulz import ns_flops
from muon_ds.partition import per_parameter_layouts

SHAPES = {"a": (4, 6), "b": (5, 5), "experts": (3, 2, 7)}  # 24, 25 (padded), 3 stacked 2 x 7


def partition_size(shape: tuple[int, ...], world: int) -> int:
    return math.ceil(math.prod(shape) / world)


def sub_groups(world: int, split: bool) -> list[list[tuple]]:
    params = [(by_dimensions(name, torch.Size(shape)), partition_size(shape, world)) for name, shape in SHAPES.items()]
    return [[p] for p in params] if split else [params]


def test_each_rank_finds_its_partition_of_every_matrix() -> None:
    """Rebuild every matrix from the ranks' flat tensors (padded partitions concatenated) and local pieces."""
    world = 3
    torch.manual_seed(0)
    full = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    rebuilt = {view.key: torch.full((view.numel,), float("nan")) for name, shape in SHAPES.items()
               for view in by_dimensions(name, torch.Size(shape))}
    for rank in range(world):
        (layout,) = per_parameter_layouts(sub_groups(world, split=False), rank, world, 5)
        flat = []
        for name, shape in SHAPES.items():
            size = partition_size(shape, world)
            values = torch.nn.functional.pad(full[name].reshape(-1), (0, world * size - math.prod(shape)))
            flat.append(values[rank * size:(rank + 1) * size])
        flat = torch.cat(flat)
        for piece, offset in layout.local[0]:
            assert torch.isnan(rebuilt[piece.key][piece.start:piece.stop]).all()  # no element held twice
            rebuilt[piece.key][piece.start:piece.stop] = flat[offset:offset + piece.numel]
    for name, shape in SHAPES.items():
        for view in by_dimensions(name, torch.Size(shape)):
            expected = full[name].reshape(-1)[view.offset:view.offset + view.numel]
            assert torch.equal(rebuilt[view.key], expected), view.key


def test_every_cut_matrix_moves_at_most_twice_its_size() -> None:
    world = 3
    (layout,) = per_parameter_layouts(sub_groups(world, split=False), 0, world, 5)
    plan = layout.plan
    total = sum(m.shape[0] * m.shape[1] for m in plan.matrices.values())
    # experts[2] (elements 28-41 of 42, partitions of 14) lies whole on rank 2 and stays there
    assert {t.piece.key for t in plan.gathers} == set(plan.matrices) - {"experts[2]"}
    assert plan.bytes_moved(1) <= 2 * total
    for key, matrix in plan.matrices.items():  # the owner receives exactly what it does not hold
        held = sum(p.numel for p, _ in per_parameter_layouts(sub_groups(world, False), plan.owner[key], world, 5)[0]
                   .local[0] if p.key == key)
        assert sum(t.piece.numel for t in plan.gathers if t.piece.key == key) == math.prod(matrix.shape) - held


def test_owners_are_balanced_over_all_sub_groups() -> None:
    """Four equal matrices in four sub-groups on two ranks: two each, not all on the first rank."""
    world = 2
    groups = [[(by_dimensions(f"w{i}", torch.Size((8, 8))), 32)] for i in range(4)]
    layouts = per_parameter_layouts(groups, 0, world, 5)
    owners = [layout.plan.owner[f"w{i}"] for i, layout in enumerate(layouts)]
    assert sorted(owners) == [0, 0, 1, 1]
    per_rank = [sum(layout.plan.flops[r] for layout in layouts) for r in range(world)]
    assert per_rank == [2 * ns_flops((8, 8))] * 2
    for i, layout in enumerate(layouts):  # each sub-group's exchange covers its own matrix only
        assert set(layout.plan.matrices) == {f"w{i}"}
        assert {t.piece.key for t in layout.plan.gathers + layout.plan.scatters} == {f"w{i}"}


def test_newton_schulz_work_is_within_the_bound() -> None:
    """Per-rank FLOPs <= 1.1 x the average + one largest matrix, for many mixed shapes and world sizes."""
    shapes = [(16, 16)] * 5 + [(8, 32)] * 3 + [(4, 4)] * 7 + [(24, 8)] * 2
    for world in (2, 3, 4, 5):
        groups = [[(by_dimensions(f"m{i}", torch.Size(s)), partition_size(s, world))] for i, s in enumerate(shapes)]
        layouts = per_parameter_layouts(groups, 0, world, 5)
        per_rank = [sum(layout.plan.flops[r] for layout in layouts) for r in range(world)]
        costs = [ns_flops(s) for s in shapes]
        assert sum(per_rank) == sum(costs)
        assert max(per_rank) <= 1.1 * sum(costs) / world + max(costs)
