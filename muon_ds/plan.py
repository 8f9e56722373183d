"""Work and communication plans for distributed Muon: pure arithmetic on who holds which elements.

Every rank computes the same plan from the same global description, so no metadata is exchanged.
A matrix is orthogonalized by one *owner* rank; the ranks holding other pieces of it send those
pieces to the owner before Newton-Schulz and get their part of the update back afterwards.
Owners are chosen to keep each rank's Newton-Schulz FLOPs within ``slack`` x the average (plus
at most one matrix), preferring the rank that already holds most of the matrix.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from muon_ds.matrices import Block
from muon_ds.newton_schulz import ns_flops


@dataclass(frozen=True)
class Matrix:
    """A logical matrix, identified by the same key on every rank."""

    key: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of ``block`` of matrix ``key``, in the block's row-major order."""

    key: str
    block: Block
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Holding:
    """``rank`` stores ``piece`` (and updates it)."""

    rank: int
    piece: Piece


@dataclass(frozen=True)
class Transfer:
    src: int
    dst: int
    piece: Piece


@dataclass
class ExchangePlan:
    """Owners, the gather before Newton-Schulz and the scatter after it, in a canonical order."""

    world_size: int
    matrices: dict[str, Matrix]
    owner: dict[str, int]
    pieces: dict[str, list[Piece]]  # per matrix: distinct pieces that tile it
    gathers: list[Transfer]
    scatters: list[Transfer]
    flops: list[int] = field(default_factory=list)  # Newton-Schulz FLOPs per rank

    def owned(self, rank: int) -> list[Matrix]:
        return [m for key, m in self.matrices.items() if self.owner[key] == rank]

    def bytes_moved(self, element_size: int) -> int:
        """Extra traffic of one step (gather plus scatter), summed over ranks."""
        return element_size * sum(t.piece.numel for t in self.gathers + self.scatters)


def _tiling(matrix: Matrix, pieces: Iterable[Piece]) -> list[Piece]:
    """Distinct pieces of one matrix, checked to tile it exactly (else the layout is wrong)."""
    distinct = sorted(set(pieces), key=lambda p: (p.block.row_start, p.block.col_start, p.start))
    blocks: dict[Block, list[Piece]] = defaultdict(list)
    for piece in distinct:
        blocks[piece.block].append(piece)
    rows, cols = matrix.shape
    if sum(b.numel for b in blocks) != rows * cols or any(
            a.overlaps(b) for i, a in enumerate(blocks) for b in list(blocks)[i + 1:]):
        raise ValueError(f"matrix {matrix.key!r} {matrix.shape}: its blocks do not tile it")
    for block, runs in blocks.items():
        cursor = 0
        for piece in runs:
            if piece.start != cursor:
                raise ValueError(f"matrix {matrix.key!r}: pieces of block {block} overlap or leave a gap "
                                 f"at element {cursor}")
            cursor = piece.stop
        if cursor != block.numel:
            raise ValueError(f"matrix {matrix.key!r}: block {block} is covered up to {cursor} of {block.numel}")
    return distinct


def make_plan(matrices: Sequence[Matrix], holdings: Sequence[Holding], world_size: int,
              ns_steps: int = 5, slack: float = 1.25) -> ExchangePlan:
    """Choose owners (balanced by Newton-Schulz FLOPs) and list the pieces to move."""
    by_key = {m.key: m for m in matrices}
    if len(by_key) != len(matrices):
        raise ValueError("matrix keys must be unique")
    held: dict[str, list[Holding]] = defaultdict(list)
    for holding in holdings:
        if holding.piece.key not in by_key:
            raise ValueError(f"a rank holds a piece of unknown matrix {holding.piece.key!r}")
        if not 0 <= holding.rank < world_size:
            raise ValueError(f"rank {holding.rank} outside a world of {world_size}")
        held[holding.piece.key].append(holding)
    tilings = {m.key: _tiling(m, (h.piece for h in held[m.key])) for m in matrices}

    cost = {m.key: ns_flops(m.shape, ns_steps) for m in matrices}
    cap = slack * sum(cost.values()) / world_size
    load = [0] * world_size
    owner: dict[str, int] = {}
    for matrix in sorted(matrices, key=lambda m: (-cost[m.key], m.key)):
        share = [0] * world_size
        for holding in held[matrix.key]:
            share[holding.rank] += holding.piece.numel
        preferred = min(range(world_size), key=lambda r: (-share[r], load[r], r))
        if load[preferred] + cost[matrix.key] > cap:
            preferred = min(range(world_size), key=lambda r: (load[r], r))
        owner[matrix.key] = preferred
        load[preferred] += cost[matrix.key]

    gathers, scatters = [], []
    for matrix in matrices:
        dst = owner[matrix.key]
        holders: dict[Piece, set[int]] = defaultdict(set)
        for holding in held[matrix.key]:
            holders[holding.piece].add(holding.rank)
        for piece in tilings[matrix.key]:
            if dst not in holders[piece]:
                gathers.append(Transfer(min(holders[piece]), dst, piece))
        scatters += [Transfer(dst, h.rank, h.piece) for h in sorted(held[matrix.key], key=_holding_order)
                     if h.rank != dst]
    return ExchangePlan(world_size, by_key, owner, tilings, gathers, scatters, load)


def _holding_order(holding: Holding) -> tuple:
    piece = holding.piece
    return (holding.rank, piece.block.row_start, piece.block.col_start, piece.start)


def restrict(plan: ExchangePlan, keys: set[str], ns_steps: int = 5) -> ExchangePlan:
    """The part of ``plan`` that concerns the matrices ``keys`` (same owners, same transfer order), for an
    engine that steps some matrices separately from the others."""
    flops = [0] * plan.world_size
    for key in keys:
        flops[plan.owner[key]] += ns_flops(plan.matrices[key].shape, ns_steps)
    return ExchangePlan(plan.world_size, {k: m for k, m in plan.matrices.items() if k in keys},
                        {k: r for k, r in plan.owner.items() if k in keys},
                        {k: p for k, p in plan.pieces.items() if k in keys},
                        [t for t in plan.gathers if t.piece.key in keys],
                        [t for t in plan.scatters if t.piece.key in keys], flops)
