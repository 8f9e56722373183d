"""A layout's index arithmetic on one rank, computed once: where every element Newton-Schulz needs comes
from, and where every element of the result goes.

The step (:mod:`muon_ds.pipeline`) only follows a route: it never looks at the plan. Owned matrices are
grouped into per-shape batches, split into those that need nothing from other ranks (orthogonalized
while the exchange travels) and those that wait for received pieces.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from muon_ds.newton_schulz import ns_flops
from muon_ds.plan import ExchangePlan, Piece, Transfer

# The cost model of replicated layouts (every rank holds every matrix whole): a rank either
# orthogonalizes its share and all-gathers the results, or orthogonalizes everything itself.
# Throughputs a step achieves, by device type: (Newton-Schulz FLOP/s, bytes/s received per rank).
# CUDA: about half an H100/H200's bf16 peak (NS measured 40-72% of it), 400 Gb/s InfiniBand per GPU
# (a data-parallel group at scale spans nodes); CPU: this project's 2-core measurements (NS about
# 0.2 TFLOP/s, gloo over loopback about 1 GB/s).
THROUGHPUT = {"cuda": (4e14, 5e10), "cpu": (2e11, 1e9)}


@dataclass(frozen=True)
class Span:
    """Elements [offset, offset + numel) of the flattened ``tensor``-th tensor of the group."""

    tensor: int
    offset: int
    numel: int


# Whole matrices below this size that are exactly one tensor are filled and applied as foreach lists
# (a kernel per matrix from C++, no Python per matrix); larger ones as one kernel each, without temporaries.
LARGE_MATRIX = 1 << 16


# A batch holds at most this fraction of the elements the rank orthogonalizes (one matrix at least): NS's
# workspace (a second buffer of the batch's size and one of G's) then stays well under the rank's Muon size.
BATCH_FRACTION = 4


@dataclass
class Moves:
    """How elements move between a batch's (N, A, B) buffer and flat storage (a group tensor, or an
    exchange buffer), computed once so that a step spends no Python per matrix on it.

    ``whole``: (matrix in the batch, tensor) where the tensor is exactly that small matrix (same shape);
    ``runs``: (tensor, flat offset there, flat offset in the batch, numel), contiguous ranges, adjacent
    ones merged (a flat partition's consecutive matrices of one shape become one run);
    ``blocks``: (matrix in the batch, piece, tensor, flat offset there) for pieces of sub-blocks (TP shards).
    Exchange buffers have tensor -1.
    """

    whole: list[tuple[int, int]] = field(default_factory=list)
    runs: list[tuple[int, int, int, int]] = field(default_factory=list)
    blocks: list[tuple[int, Piece, int, int]] = field(default_factory=list)


@dataclass
class Batch:
    """Owned matrices of one shape (all, or a share: :data:`BATCH_FRACTION`), orthogonalized together, and
    where their elements come from and go.

    ``waits``: some piece arrives from a peer. ``local``: this rank's pieces (they fill the buffer and
    receive the result); ``receive``: from the gather's receive buffer; ``give``: into the scatter's
    send buffer.
    """

    shape: tuple[int, int]
    keys: list[str]
    waits: bool
    local: Moves = field(default_factory=Moves)
    receive: Moves = field(default_factory=Moves)
    give: Moves = field(default_factory=Moves)


@dataclass
class Exchange:
    """One all_to_all: sizes per peer; ``any``: some rank of the group sends something (all must join)."""

    send_sizes: list[int]
    recv_sizes: list[int]
    any: bool


@dataclass
class Route:
    """``batches``: those whose results other ranks hold come first (their ``giving`` count), so that the
    scatter travels while the rest are orthogonalized; within each part, local ones before waiting ones."""

    batches: list[Batch]
    giving: int
    send: list[tuple[int, int, int, int]]  # local pieces for other owners: (tensor, offset, send offset, numel)
    gather: Exchange
    scatter: Exchange
    get: dict[tuple[int, int], list[tuple[int, int, int, int]]]  # received results by matrix shape:
    # (tensor, offset there, offset in the receive buffer, numel)


def is_replicated(plan: ExchangePlan) -> bool:
    """Every rank holds every matrix whole."""
    return (not plan.gathers and all(len(pieces) == 1 for pieces in plan.pieces.values())
            and len(plan.scatters) == (plan.world_size - 1) * len(plan.matrices))


def redundant_is_cheaper(plan: ExchangePlan, element_size: int, device_type: str) -> bool:
    """For a replicated layout: is orthogonalizing every matrix on every rank faster than each rank
    doing its share and receiving the others' results? (times from :data:`THROUGHPUT`)."""
    flops_per_s, bytes_per_s = THROUGHPUT.get(device_type, THROUGHPUT["cuda"])
    total = sum(ns_flops(m.shape) for m in plan.matrices.values())
    received = element_size * sum(m.shape[0] * m.shape[1] for m in plan.matrices.values())
    received *= (plan.world_size - 1) / plan.world_size
    return total / flops_per_s <= max(plan.flops) / flops_per_s + received / bytes_per_s


def build_route(local: list[list[tuple[Piece, int]]], plan: ExchangePlan, rank: int, skip: frozenset[str],
                redundant: bool, shapes: tuple[tuple[int, ...], ...] = ()) -> Route:
    """The route of this rank through ``plan``, leaving out the matrices in ``skip`` (the same on every
    rank). ``redundant`` (replicated layouts only): every rank orthogonalizes every matrix itself.
    ``shapes``: the group tensors' shapes, where known (a tensor that is exactly a matrix needs no view)."""
    where = {piece: Span(t, offset, piece.numel) for t, pieces in enumerate(local) for piece, offset in pieces}
    gathers = [t for t in plan.gathers if t.piece.key not in skip]
    scatters = [t for t in plan.scatters if t.piece.key not in skip]
    if redundant:
        owned = [key for key in plan.matrices if key not in skip and any(p in where for p in plan.pieces[key])]
        gathers, scatters = [], []
    else:
        owned = [m.key for m in plan.owned(rank) if m.key not in skip]
    arriving = {t.piece.key for t in gathers if t.dst == rank}
    grouped: dict[tuple[tuple[int, int], bool], list[str]] = defaultdict(list)
    for key in owned:
        grouped[(plan.matrices[key].shape, key in arriving)].append(key)
    batches, slot = [], {}
    cap = sum(plan.matrices[key].shape[0] * plan.matrices[key].shape[1] for key in owned) / BATCH_FRACTION
    for (shape, waits), keys in sorted(grouped.items(), key=lambda item: item[0][1]):  # local batches first
        parts = max(1, math.ceil(len(keys) * shape[0] * shape[1] / cap)) if cap else 1
        per = math.ceil(len(keys) / parts)
        for start in range(0, len(keys), per):
            slot.update((key, (len(batches), index)) for index, key in enumerate(keys[start:start + per]))
            batches.append(Batch(shape, keys[start:start + per], waits))
    moved: dict[tuple[int, str], list[tuple[int, Piece, int, int]]] = defaultdict(list)
    for key in owned:
        b, i = slot[key]
        moved[b, "local"] += [(i, p, where[p].tensor, where[p].offset) for p in plan.pieces[key] if p in where]
    gather_sizes, incoming = _sizes(gathers, rank, plan.world_size)
    for offset, t in incoming:
        b, i = slot[t.piece.key]
        moved[b, "receive"].append((i, t.piece, -1, offset))
    scatter_sizes, arriving_results = _sizes(scatters, rank, plan.world_size)
    offset = 0
    for t in _outgoing(scatters, rank):
        b, i = slot[t.piece.key]
        moved[b, "give"].append((i, t.piece, -1, offset))
        offset += t.piece.numel
    for (b, kind), entries in moved.items():
        setattr(batches[b], kind, _moves(entries, batches[b].shape, shapes))
    send, offset = [], 0
    for t in _outgoing(gathers, rank):
        send.append((where[t.piece].tensor, where[t.piece].offset, offset, t.piece.numel))
        offset += t.piece.numel
    get: dict[tuple[int, int], list[tuple[int, int, int, int]]] = defaultdict(list)
    for offset, t in arriving_results:
        span = where[t.piece]
        get[plan.matrices[t.piece.key].shape].append((span.tensor, span.offset, offset, span.numel))
    batches.sort(key=lambda batch: not (batch.give.runs or batch.give.blocks))  # stable
    giving = sum(bool(batch.give.runs or batch.give.blocks) for batch in batches)
    return Route(batches, giving, _merged(send), Exchange(*gather_sizes, bool(gathers)),
                 Exchange(*scatter_sizes, bool(scatters)), {shape: _merged(runs) for shape, runs in get.items()})


def _moves(entries: list[tuple[int, Piece, int, int]], shape: tuple[int, int],
           shapes: tuple[tuple[int, ...], ...]) -> Moves:
    """Sort a batch's pieces into whole tensors, merged contiguous runs and sub-block pieces."""
    moves, size = Moves(), shape[0] * shape[1]
    for i, piece, tensor, offset in entries:
        if piece.block.shape != shape:
            moves.blocks.append((i, piece, tensor, offset))
        elif (tensor >= 0 and size < LARGE_MATRIX and piece.numel == size and offset == 0
              and tensor < len(shapes) and tuple(shapes[tensor]) == shape):
            moves.whole.append((i, tensor))
        else:
            moves.runs.append((tensor, offset, i * size + piece.start, piece.numel))
    moves.runs = _merged(moves.runs)
    return moves


def _merged(runs: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """(tensor, offset, other offset, numel) runs, those continuing each other on both sides joined."""
    joined: list[tuple[int, int, int, int]] = []
    for tensor, offset, other, numel in sorted(runs, key=lambda r: (r[0], r[2])):
        if joined:
            last_tensor, last_offset, last_other, last_numel = joined[-1]
            if (last_tensor, last_offset + last_numel, last_other + last_numel) == (tensor, offset, other):
                joined[-1] = (tensor, last_offset, last_other, last_numel + numel)
                continue
        joined.append((tensor, offset, other, numel))
    return joined


def _outgoing(transfers: list[Transfer], rank: int) -> list[Transfer]:
    return sorted((t for t in transfers if t.src == rank), key=lambda t: t.dst)  # stable: plan order


def _sizes(transfers: list[Transfer], rank: int, world_size: int
           ) -> tuple[tuple[list[int], list[int]], list[tuple[int, Transfer]]]:
    """The all_to_all sizes of ``transfers``, and what arrives here at which receive-buffer offset."""
    send_sizes, recv_sizes = [0] * world_size, [0] * world_size
    for t in _outgoing(transfers, rank):
        send_sizes[t.dst] += t.piece.numel
    arriving, offset = [], 0
    for t in sorted((t for t in transfers if t.dst == rank), key=lambda t: t.src):
        recv_sizes[t.src] += t.piece.numel
        arriving.append((offset, t))
        offset += t.piece.numel
    return (send_sizes, recv_sizes), arriving


def cached_route(cache: dict, local: list[list[tuple[Piece, int]]], plan: ExchangePlan, rank: int,
                 skip: frozenset[str], element_size: int, device_type: Optional[str],
                 shapes: tuple[tuple[int, ...], ...] = ()) -> Route:
    """The route for this set of left-out matrices (and tensor shapes), built on first use."""
    key = (skip, element_size, device_type, shapes)
    if key not in cache:
        redundant = (plan.world_size > 1 and is_replicated(plan)
                     and redundant_is_cheaper(plan, element_size, device_type or "cpu"))
        cache[key] = build_route(local, plan, rank, skip, redundant, shapes)
    return cache[key]
