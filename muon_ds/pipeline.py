"""Muon's step for one param group, as stages over per-shape batches that follow a :class:`~muon_ds.route.Route`.

momentum (foreach) -> Nesterov written straight into NS-dtype buffers (send buffer, batch buffers) ->
gather of cut matrices, in flight while the batches that need nothing from peers are orthogonalized and
applied -> the received batches -> scatter of results -> apply the received results. Single process,
replicated and partitioned layouts differ only in their routes. Weight decay is one foreach over the
group's tensors, the update one foreach per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from muon_ds.plan import Piece
from muon_ds.route import Batch, Exchange, Route, Span

FILL_CHUNK = 64  # small matrices whose float32 Nesterov temporaries exist at once (one foreach per chunk)
LARGE_MATRIX = 1 << 16  # elements from which a kernel per matrix costs less than a temporary
Orthogonalize = Callable[[torch.Tensor], torch.Tensor]  # in place on an (N, A, B) NS-dtype batch


@dataclass
class Hyper:
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    scale: Callable[[tuple[int, int]], float]  # the update's factor for a matrix shape


def piece_views(matrix: torch.Tensor, piece: Piece) -> list[tuple[torch.Tensor, int, int]]:
    """Views of the (A, B) ``matrix`` holding ``piece``, each with the [lo, hi) range of the piece it holds.

    A piece of a whole matrix is one contiguous range; a piece of a block (a TP shard) is cut into a
    partial first row, whole rows, and a partial last row of that block."""
    b = piece.block
    if b.shape == tuple(matrix.shape):
        return [(matrix.view(-1)[piece.start:piece.stop], 0, piece.numel)]
    block = matrix[b.row_start:b.row_stop, b.col_start:b.col_stop]
    cols = b.col_stop - b.col_start
    views, position = [], piece.start
    while position < piece.stop:
        row, col = divmod(position, cols)
        if col or piece.stop - position < cols:
            end = min(piece.stop, (row + 1) * cols)
            views.append((block[row, col:col + end - position], position - piece.start, end - piece.start))
        else:
            rows = (piece.stop - position) // cols
            end = position + rows * cols
            views.append((block[row:row + rows], position - piece.start, end - piece.start))
        position = end
    return views


def momentum_(momenta: list[torch.Tensor], grads: list[torch.Tensor], mu: float) -> None:
    """m <- mu m + g, one foreach over the group's tensors."""
    if momenta:
        torch._foreach_mul_(momenta, mu)
        torch._foreach_add_(momenta, grads)


def direction_into(out: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, hyper: Hyper) -> None:
    """``out`` <- g + mu m (Nesterov) or m, computed in the inputs' precision and rounded once to out's."""
    grad, momentum = grad.view(out.shape), momentum.view(out.shape)
    if hyper.nesterov:
        torch.add(grad, momentum, alpha=hyper.momentum, out=out)
    else:
        out.copy_(momentum)


def _start(exchange: Exchange, send: torch.Tensor, dtype: torch.dtype, device: torch.device,
           group: Optional[dist.ProcessGroup]) -> tuple[torch.Tensor, Optional[dist.Work]]:
    recv = torch.empty(sum(exchange.recv_sizes), dtype=dtype, device=device)
    if not exchange.any:
        return recv, None
    work = dist.all_to_all_single(recv, send, exchange.recv_sizes, exchange.send_sizes, group=group, async_op=True)
    return recv, work


def run(route: Route, params: list[torch.Tensor], grads: list[torch.Tensor], momenta: list[torch.Tensor],
        hyper: Hyper, orthogonalize_: Orthogonalize, dtype: torch.dtype, device: torch.device,
        group: Optional[dist.ProcessGroup]) -> None:
    """One Muon step of a group. ``params[t]`` etc. are the group's tensors (None where left out)."""
    flat, g_flat, m_flat = _Flat(params), _Flat(grads), _Flat(momenta)
    momentum_([m for m in momenta if m is not None], [g for g in grads if g is not None], hyper.momentum)

    def source(span: Span, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = span.offset + lo
        return g_flat[span.tensor][start:span.offset + hi], m_flat[span.tensor][start:span.offset + hi]

    def whole(span: Span, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, m) of a whole matrix; a tensor that is exactly one matrix needs no slicing."""
        if span.offset == 0 and span.numel == grads[span.tensor].numel():
            return grads[span.tensor].reshape(shape), momenta[span.tensor].view(shape)
        return tuple(t.view(shape) for t in source(span, 0, span.numel))

    send = torch.empty(sum(route.gather.send_sizes), dtype=dtype, device=device)
    offset = 0
    for span in route.send:
        direction_into(send[offset:offset + span.numel], *source(span, 0, span.numel), hyper)
        offset += span.numel
    received, gathering = _start(route.gather, send, dtype, device, group)
    del send
    decayed = [p for p in params if p is not None]
    if hyper.weight_decay and decayed:  # a rank may hold none of the group's tensors
        torch._foreach_mul_(decayed, 1.0 - hyper.lr * hyper.weight_decay)
    give = torch.empty(sum(route.scatter.send_sizes), dtype=dtype, device=device)
    for batch in route.batches:
        if batch.waits and gathering is not None:
            gathering.wait()
            gathering = None
        result = _orthogonalized(batch, received, source, whole, hyper, orthogonalize_, dtype, device)
        _apply(batch, result, flat, hyper)
        for index, piece, at in batch.give:
            for view, lo, hi in piece_views(result[index], piece):
                give[at + lo:at + hi].view(view.shape).copy_(view)
    if gathering is not None:
        gathering.wait()
    results, scattering = _start(route.scatter, give, dtype, device, group)
    if scattering is not None:
        scattering.wait()
    for at, span, shape in route.get:
        flat[span.tensor][span.offset:span.offset + span.numel].add_(results[at:at + span.numel],
                                                                      alpha=-hyper.lr * hyper.scale(shape))


class _Flat:
    """The group's tensors flattened, each on first use (a step touching whole tensors needs none)."""

    def __init__(self, tensors: list[Optional[torch.Tensor]]) -> None:
        self.tensors = tensors
        self.flat: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.flat:
            self.flat[index] = self.tensors[index].reshape(-1)
        return self.flat[index]


def _orthogonalized(batch: Batch, received: torch.Tensor, source: Callable, whole: Callable, hyper: Hyper,
                    orthogonalize_: Orthogonalize, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The batch's matrices assembled in one NS-dtype buffer, then orthogonalized."""
    buffer = torch.empty(len(batch.keys), *batch.shape, dtype=dtype, device=device)
    matrices = buffer.unbind(0)
    size = batch.shape[0] * batch.shape[1]
    wholes = []  # (matrix, g, m) of whole local matrices: filled by chunks of foreach ops
    for index, piece, span in batch.fill:
        if piece.numel == size:
            if size >= LARGE_MATRIX:  # one kernel per matrix, no temporary
                direction_into(matrices[index], *whole(span, batch.shape), hyper)
            else:
                wholes.append((matrices[index], *whole(span, batch.shape)))
            continue
        for view, lo, hi in piece_views(matrices[index], piece):
            direction_into(view, *source(span, lo, hi), hyper)
    for start in range(0, len(wholes), FILL_CHUNK):
        targets, grads, momenta = zip(*wholes[start:start + FILL_CHUNK])
        directions = torch._foreach_add(grads, momenta, alpha=hyper.momentum) if hyper.nesterov else momenta
        torch._foreach_copy_(targets, directions)  # rounded once to the NS dtype
    for index, piece, at in batch.receive:
        for view, lo, hi in piece_views(matrices[index], piece):
            view.copy_(received[at + lo:at + hi].view(view.shape))
    return orthogonalize_(buffer)


def _apply(batch: Batch, result: torch.Tensor, flat: _Flat, hyper: Hyper) -> None:
    """W <- W - lr s O for this rank's pieces of the batch, one foreach."""
    targets, updates = [], []
    matrices = result.unbind(0)
    size = batch.shape[0] * batch.shape[1]
    for index, piece, span in batch.keep:
        if piece.numel == size and span.offset == 0 and span.numel == flat.tensors[span.tensor].numel():
            targets.append(flat.tensors[span.tensor].view(batch.shape))  # a tensor that is exactly this matrix
            updates.append(matrices[index])
            continue
        for view, lo, hi in piece_views(matrices[index], piece):
            targets.append(flat[span.tensor][span.offset + lo:span.offset + hi].view(view.shape))
            updates.append(view)
    if targets:
        torch._foreach_add_(targets, updates, alpha=-hyper.lr * hyper.scale(batch.shape))
