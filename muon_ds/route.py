"""A layout's index arithmetic on one rank, computed once: where every element Newton-Schulz needs comes
from, and where every element of the result goes.

The step (:mod:`muon_ds.pipeline`) only follows a route: it never looks at the plan. Owned matrices are
grouped into per-shape batches, split into those that need nothing from other ranks (orthogonalized
while the exchange travels) and those that wait for received pieces.
"""

from __future__ import annotations

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


@dataclass
class Batch:
    """Owned matrices of one shape, orthogonalized together, and where their elements come from and go.

    ``waits``: some piece arrives from a peer. Each list holds (index of the matrix in the batch, piece, ...).
    """

    shape: tuple[int, int]
    keys: list[str]
    waits: bool
    fill: list[tuple[int, Piece, Span]] = field(default_factory=list)  # local pieces
    receive: list[tuple[int, Piece, int]] = field(default_factory=list)  # (.., offset in the receive buffer)
    keep: list[tuple[int, Piece, Span]] = field(default_factory=list)  # results for this rank's tensors
    give: list[tuple[int, Piece, int]] = field(default_factory=list)  # (.., offset in the send buffer)


@dataclass
class Exchange:
    """One all_to_all: sizes per peer; ``any``: some rank of the group sends something (all must join)."""

    send_sizes: list[int]
    recv_sizes: list[int]
    any: bool


@dataclass
class Route:
    batches: list[Batch]
    send: list[Span]  # local pieces for other owners, in all_to_all order
    gather: Exchange
    scatter: Exchange
    get: list[tuple[int, Span, tuple[int, int]]]  # received results: (offset, where, matrix shape)


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
                redundant: bool) -> Route:
    """The route of this rank through ``plan``, leaving out the matrices in ``skip`` (the same on every
    rank). ``redundant`` (replicated layouts only): every rank orthogonalizes every matrix itself."""
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
    for (shape, waits), keys in sorted(grouped.items(), key=lambda item: item[0][1]):  # local batches first
        slot.update((key, (batches.__len__(), index)) for index, key in enumerate(keys))
        batches.append(Batch(shape, keys, waits))
    for key in owned:
        b, i = slot[key]
        batches[b].fill += [(i, p, where[p]) for p in plan.pieces[key] if p in where]
    for piece, span in where.items():
        if piece.key in slot:
            b, i = slot[piece.key]
            batches[b].keep.append((i, piece, span))
    gather_sizes, incoming = _sizes(gathers, rank, plan.world_size)
    for offset, t in incoming:
        b, i = slot[t.piece.key]
        batches[b].receive.append((i, t.piece, offset))
    scatter_sizes, arriving_results = _sizes(scatters, rank, plan.world_size)
    offset = 0
    for t in _outgoing(scatters, rank):
        b, i = slot[t.piece.key]
        batches[b].give.append((i, t.piece, offset))
        offset += t.piece.numel
    return Route(batches, [where[t.piece] for t in _outgoing(gathers, rank)],
                 Exchange(*gather_sizes, bool(gathers)), Exchange(*scatter_sizes, bool(scatters)),
                 [(offset, where[t.piece], plan.matrices[t.piece.key].shape) for offset, t in arriving_results])


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
                 skip: frozenset[str], element_size: int, device_type: Optional[str]) -> Route:
    """The route for this set of left-out matrices, built on first use."""
    key = (skip, element_size, device_type)
    if key not in cache:
        redundant = (plan.world_size > 1 and is_replicated(plan)
                     and redundant_is_cheaper(plan, element_size, device_type or "cpu"))
        cache[key] = build_route(local, plan, rank, skip, redundant)
    return cache[key]
