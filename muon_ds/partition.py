"""Layouts of the usual ways engines store matrices: replicated tensors and equal flat partitions.

Pure arithmetic: from where each matrix sits, compute which pieces every rank holds and the
exchange plan, identically on all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from muon_ds.matrices import MatrixView, Views
from muon_ds.plan import ExchangePlan, Holding, Matrix, Piece, make_plan
from muon_ds.route import Route, cached_route


@dataclass
class GroupLayout:
    """A Muon group's layout on this rank: per tensor of the group, its pieces and their offsets."""

    local: list[list[tuple[Piece, int]]]
    plan: ExchangePlan
    rank: int = 0
    process_group: Optional[dist.ProcessGroup] = None
    device: Optional[torch.device] = None  # for the exchange when this rank holds none of the group's tensors
    routes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def route(self, skip: frozenset[str], dtype: torch.dtype, device: torch.device) -> Route:
        """The step's index arithmetic, computed once per set of left-out (frozen) matrices."""
        return cached_route(self.routes, self.local, self.plan, self.rank, skip, dtype.itemsize, device.type)


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
        stop = start + view.numel
        first, last = start // partition_size, (stop - 1) // partition_size
        if last >= world_size:
            raise ValueError(f"matrix {view.key!r} ends at {stop}, past {world_size} partitions of {partition_size}")
        for r in range(first, last + 1):
            lo = max(start, r * partition_size)
            hi = min(stop, (r + 1) * partition_size)
            piece = Piece(view.key, view.block, lo - start, hi - start)
            holdings.append(Holding(r, piece))
            if r == rank:
                local.append((piece, lo - r * partition_size))
    return GroupLayout([local], make_plan(matrices, holdings, world_size, ns_steps), rank, process_group)
