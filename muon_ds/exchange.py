"""Carry out an :class:`~muon_ds.plan.ExchangePlan`: one all_to_all to the owners, one back."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.distributed as dist

from muon_ds.plan import ExchangePlan, Matrix, Piece, Transfer


def _all_to_all(transfers: list[Transfer], rank: int, world_size: int, payload: Callable[[Piece], torch.Tensor],
                group: Optional[dist.ProcessGroup], dtype: torch.dtype, device: torch.device
                ) -> dict[Piece, torch.Tensor]:
    """Send each transfer's payload from src to dst; returns what this rank received, by piece."""
    outgoing = sorted((t for t in transfers if t.src == rank), key=lambda t: t.dst)  # stable: plan order
    incoming = sorted((t for t in transfers if t.dst == rank), key=lambda t: t.src)
    send_sizes, recv_sizes = [0] * world_size, [0] * world_size
    for t in outgoing:
        send_sizes[t.dst] += t.piece.numel
    for t in incoming:
        recv_sizes[t.src] += t.piece.numel
    send = (torch.cat([payload(t.piece).to(dtype) for t in outgoing]) if outgoing
            else torch.empty(0, dtype=dtype, device=device))
    recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    received, offset = {}, 0
    for t in incoming:
        received[t.piece] = recv[offset:offset + t.piece.numel]
        offset += t.piece.numel
    return received


def _region(matrix: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The block of ``matrix`` a piece belongs to, flattened row-major (a view for whole blocks)."""
    b = piece.block
    return matrix[b.row_start:b.row_stop, b.col_start:b.col_stop].reshape(-1)


def gather_owned(plan: ExchangePlan, rank: int, local: Mapping[Piece, torch.Tensor],
                 group: Optional[dist.ProcessGroup], dtype: torch.dtype, device: torch.device,
                 keys: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """Assemble the matrices this rank owns (those in ``keys``, if given) from its pieces and those sent to it.

    ``keys`` lets a single-process step leave out parameters that got no gradient.
    """
    received = (_all_to_all(plan.gathers, rank, plan.world_size, local.__getitem__, group, dtype, device)
                if plan.gathers else {})
    full = {}
    for matrix in plan.owned(rank):
        if keys is not None and matrix.key not in keys:
            continue
        out = torch.empty(matrix.shape, dtype=dtype, device=device)
        blocks: dict = {}
        for piece in plan.pieces[matrix.key]:
            data = local[piece] if piece in local else received[piece]
            target = blocks.setdefault(piece.block, _region(out, piece) if _is_whole(piece, matrix)
                                       else torch.empty(piece.block.numel, dtype=dtype, device=device))
            target[piece.start:piece.stop] = data
        for block, data in blocks.items():
            if block.shape != matrix.shape:
                out[block.row_start:block.row_stop, block.col_start:block.col_stop] = data.view(block.shape)
        full[matrix.key] = out
    return full


def scatter_updates(plan: ExchangePlan, rank: int, updates: Mapping[str, torch.Tensor], wanted: Iterable[Piece],
                    group: Optional[dist.ProcessGroup], dtype: torch.dtype, device: torch.device
                    ) -> dict[Piece, torch.Tensor]:
    """Send each holder its piece of the owners' updates; returns the pieces this rank holds."""

    def payload(piece: Piece) -> torch.Tensor:
        return _region(updates[piece.key], piece)[piece.start:piece.stop]

    received = (_all_to_all(plan.scatters, rank, plan.world_size, payload, group, dtype, device)
                if plan.scatters else {})
    return {piece: payload(piece) if plan.owner[piece.key] == rank else received[piece] for piece in wanted}


def _is_whole(piece: Piece, matrix: Matrix) -> bool:
    return piece.block.shape == matrix.shape
