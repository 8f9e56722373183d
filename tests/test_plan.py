"""Exchange plans: tiling checks, who sends what, and the Newton-Schulz balance bound."""

import random

import pytest
import torch

from muon_ds.exchange import gather_owned, scatter_updates
from muon_ds.matrices import Block, MatrixView
from muon_ds.newton_schulz import ns_flops
from muon_ds.partition import partitioned_layout, replicated_layout
from muon_ds.plan import Holding, Matrix, Piece, make_plan


def test_partition_cut_moves_only_the_cut_matrix() -> None:
    """a and c lie inside one partition each and stay; b straddles the boundary at 32."""
    views = [MatrixView.whole("a", (4, 6)), MatrixView.whole("b", (6, 4)), MatrixView.whole("c", (2, 4))]
    spans = [(views[0], 0), (views[1], 24), (views[2], 48)]
    layout = partitioned_layout(spans, partition_size=32, rank=0, world_size=2, ns_steps=5)
    plan = layout.plan
    moved = {t.piece.key for t in plan.gathers} | {t.piece.key for t in plan.scatters}
    assert moved == {"b"}
    assert plan.bytes_moved(1) == 2 * min(8, 16)  # the smaller piece goes to the owner and comes back
    assert [(p.key, p.start, p.stop, offset) for p, offset in layout.local[0]] == [("a", 0, 24, 0), ("b", 0, 8, 24)]


def test_replicated_sends_each_update_to_every_other_rank() -> None:
    views = (MatrixView.whole("a", (4, 4)), MatrixView.whole("b", (4, 4)))
    plan = replicated_layout([views], rank=0, world_size=3, ns_steps=5).plan
    assert not plan.gathers and len(plan.scatters) == 2 * 2
    assert sorted(plan.owner.values()) == [0, 1]  # the work is split


def test_pieces_must_tile_each_matrix() -> None:
    a = Matrix("a", (4, 4))
    whole = Block.whole((4, 4))
    with pytest.raises(ValueError, match="covered up to 10 of 16"):
        make_plan([a], [Holding(0, Piece("a", whole, 0, 10))], 2)
    with pytest.raises(ValueError, match="overlap or leave a gap"):
        make_plan([a], [Holding(0, Piece("a", whole, 0, 10)), Holding(1, Piece("a", whole, 8, 16))], 2)


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_newton_schulz_work_is_balanced(world: int) -> None:
    rng = random.Random(world)
    matrices = [Matrix(f"m{i}", (rng.choice([16, 64, 128]), rng.choice([16, 64, 256]))) for i in range(60)]
    spans, offset = [], 0
    for m in matrices:
        spans.append((MatrixView.whole(m.key, m.shape), offset))
        offset += m.shape[0] * m.shape[1]
    size = -(-offset // world)
    plan = partitioned_layout(spans, size, 0, world, 5).plan
    costs = [ns_flops(m.shape) for m in matrices]
    assert max(plan.flops) <= 1.25 * sum(costs) / world + max(costs)
    assert sum(plan.flops) == sum(costs)


def test_column_blocks_assemble_into_the_matrix() -> None:
    """Tensor-parallel shards: two column blocks, each held as row-major runs, make one matrix."""
    full = torch.arange(24.0).reshape(4, 6)
    left, right = Block(0, 4, 0, 3), Block(0, 4, 3, 6)
    pieces = {Piece("w", left, 0, 12): full[:, :3].reshape(-1), Piece("w", right, 0, 5): full[:, 3:].reshape(-1)[:5],
              Piece("w", right, 5, 12): full[:, 3:].reshape(-1)[5:]}
    plan = make_plan([Matrix("w", (4, 6))], [Holding(0, p) for p in pieces], 1)
    assembled = gather_owned(plan, 0, pieces, None, torch.float32, torch.device("cpu"))
    assert torch.equal(assembled["w"], full)
    back = scatter_updates(plan, 0, {"w": full * 2}, list(pieces), None, torch.float32, torch.device("cpu"))
    for piece, data in pieces.items():
        assert torch.equal(back[piece], data * 2)


def test_balance_may_move_a_whole_matrix_off_an_overloaded_rank() -> None:
    """Rank 1 would hold b and c (4480 FLOPs > 1.25 x the average 3520): c goes to rank 0."""
    views = [MatrixView.whole("a", (4, 6)), MatrixView.whole("b", (6, 4)), MatrixView.whole("c", (4, 4))]
    plan = partitioned_layout([(views[0], 0), (views[1], 24), (views[2], 48)], 32, 0, 2, 5).plan
    assert plan.owner == {"a": 0, "b": 1, "c": 0}


def test_replicated_layouts_choose_by_the_cost_model() -> None:
    """Small matrices: every rank orthogonalizes them all (cheaper than receiving results); large ones on
    GPUs: each rank its share, then the results are exchanged."""
    from muon_ds.matrices import MatrixView
    from muon_ds.route import is_replicated, redundant_is_cheaper

    def plan(shape: tuple[int, int], count: int, world: int):
        views = [(MatrixView.whole(f"m{i}", shape),) for i in range(count)]
        return replicated_layout(views, rank=0, world_size=world, ns_steps=5).plan

    tiny, small, large = plan((8, 8), 16, 8), plan((64, 64), 16, 8), plan((4096, 4096), 16, 8)
    assert is_replicated(small) and is_replicated(large)
    assert redundant_is_cheaper(small, 2, "cuda") and redundant_is_cheaper(tiny, 2, "cpu")
    assert not redundant_is_cheaper(large, 2, "cuda") and not redundant_is_cheaper(small, 2, "cpu")
    views = [MatrixView.whole("w", (4, 6))]
    assert not is_replicated(partitioned_layout([(views[0], 0)], 12, 0, 2, 5).plan)
