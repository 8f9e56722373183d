"""Layouts of the usual ways engines store matrices: replicated tensors, equal flat partitions and
per-parameter partitions.

Pure arithmetic: from where each matrix sits, compute which pieces every rank holds and the
exchange plan, identically on all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from muon_ds.matrices import MatrixView, Views
from muon_ds.plan import ExchangePlan, Holding, Matrix, Piece, make_plan, restrict
from muon_ds.route import Route, cached_route

# Owners keep each rank's Newton-Schulz FLOPs within this factor of the average (plus one matrix) when
# every matrix is cut anyway (per-parameter partitions), so nothing is gained by favouring holders.
CUT_EVERYWHERE_SLACK = 1.1


@dataclass
class GroupLayout:
    """A Muon group's layout on this rank: per tensor of the group, its pieces and their offsets."""

    local: list[list[tuple[Piece, int]]]
    plan: ExchangePlan
    rank: int = 0
    process_group: Optional[dist.ProcessGroup] = None
    device: Optional[torch.device] = None  # for the exchange when this rank holds none of the group's tensors
    routes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def route(self, skip: frozenset[str], dtype: torch.dtype, device: torch.device,
              shapes: tuple[tuple[int, ...], ...] = ()) -> Route:
        """The step's index arithmetic, computed once per set of left-out (frozen) matrices; ``shapes``
        (the group tensors', where known) lets tensors that are exactly a matrix go without views."""
        return cached_route(self.routes, self.local, self.plan, self.rank, skip, dtype.itemsize, device.type,
                            shapes)


def replicated_layout(tensor_views: Sequence[Views], rank: int, world_size: int, ns_steps: int,
                      process_group: Optional[dist.ProcessGroup] = None) -> GroupLayout:
    """Every rank holds every tensor whole (one process, ZeRO-0): owners split the work, results go to all."""
    local, matrices, holdings = [], [], []
    for views in tensor_views:
        pieces = []
        for view in views:
            piece = Piece(view.key, view.block, 0, view.numel)
            pieces.append((piece, view.offset))
            matrices.append(Matrix(view.key, view.shape))
            holdings += [Holding(r, piece) for r in range(world_size)]
        local.append(pieces)
    return GroupLayout(local, make_plan(matrices, holdings, world_size, ns_steps), rank, process_group)


def partitioned_layout(spans: Sequence[tuple[MatrixView, int]], partition_size: int, rank: int, world_size: int,
                       ns_steps: int, process_group: Optional[dist.ProcessGroup] = None) -> GroupLayout:
    """A flat buffer cut into equal partitions (ZeRO 1/2): rank r's one tensor is [r P, (r + 1) P).

    ``spans`` gives each whole matrix and the flat offset of its first element.
    """
    matrices, holdings, local = [], [], []
    for view, start in spans:
        if view.block.shape != view.shape:
            raise ValueError(f"matrix {view.key!r}: a flat partition layout takes whole matrices")
        matrices.append(Matrix(view.key, view.shape))
        if start + view.numel > world_size * partition_size:
            raise ValueError(f"matrix {view.key!r} ends at {start + view.numel}, past {world_size} partitions "
                             f"of {partition_size}")
        for r, piece, offset in _cut(view, start, partition_size):
            holdings.append(Holding(r, piece))
            if r == rank:
                local.append((piece, offset))
    return GroupLayout([local], make_plan(matrices, holdings, world_size, ns_steps), rank, process_group)


def per_parameter_layouts(sub_groups: Sequence[Sequence[tuple[Views, int]]], rank: int, world_size: int,
                          ns_steps: int, process_group: Optional[dist.ProcessGroup] = None) -> list[GroupLayout]:
    """Each parameter split on its own into equal partitions (ZeRO-3), one layout per sub-group.

    ``sub_groups[s]`` lists the sub-group's parameters as (their matrices, partition size P): rank r holds
    elements [r P, (r + 1) P) of each (padded at the end), and its one tensor for the sub-group is the
    concatenation of those partitions. Owners are balanced over all sub-groups at once; each sub-group's
    exchange covers only its own matrices, since the engine steps the sub-groups one at a time.
    """
    matrices, holdings, local, keys = [], [], [], []
    for params in sub_groups:
        pieces, names, base = [], set(), 0
        for views, partition_size in params:
            for view in views:
                matrices.append(Matrix(view.key, view.shape))
                names.add(view.key)
                for r, piece, offset in _cut(view, view.offset, partition_size):
                    holdings.append(Holding(r, piece))
                    if r == rank:
                        pieces.append((piece, base + offset))
            base += partition_size
        local.append(pieces)
        keys.append(names)
    plan = make_plan(matrices, holdings, world_size, ns_steps, slack=CUT_EVERYWHERE_SLACK)
    return [GroupLayout([pieces], restrict(plan, names, ns_steps), rank, process_group)
            for pieces, names in zip(local, keys)]


def _cut(view: MatrixView, start: int, partition_size: int) -> Iterator[tuple[int, Piece, int]]:
    """A matrix stored from flat element ``start`` of equal partitions: per rank it reaches,
    (rank, its piece, the piece's offset in that rank's partition)."""
    stop = start + view.numel
    for r in range(start // partition_size, (stop - 1) // partition_size + 1):
        lo, hi = max(start, r * partition_size), min(stop, (r + 1) * partition_size)
        yield r, Piece(view.key, view.block, lo - start, hi - start), lo - r * partition_size
