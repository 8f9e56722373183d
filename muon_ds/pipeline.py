"""Muon's step for one param group, as stages over per-shape batches that follow a :class:`~muon_ds.route.Route`.

momentum (foreach) -> Nesterov written straight into NS-dtype buffers (send buffer, batch buffers) ->
gather of cut matrices, in flight while the batches that need nothing from peers are orthogonalized and
applied -> the received batches -> scatter of results, started as soon as the batches whose results other
ranks hold are done (those come first), in flight while the rest are orthogonalized -> apply the
received results. Single process, replicated and partitioned layouts differ only in their routes. Weight
decay is one foreach over the group's tensors, the update one foreach per batch; one batch's buffers exist
at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from muon_ds.plan import Piece
from muon_ds.route import LARGE_MATRIX, Exchange, Moves, Route

# Nesterov directions are written, and updates applied, a segment at a time, of at most this fraction of
# the buffer (and LARGE_MATRIX elements at least): their float32 temporaries (foreach results, and on CPU
# a mixed-precision out= or foreach add) are at most that large.
SEGMENT_FRACTION = 8
CPU_SEGMENT = 1 << 16
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


def direction_into(out: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, hyper: Hyper,
                   segment: int) -> None:
    """``out`` <- g + mu m (Nesterov) or m, computed in the inputs' precision and rounded once to out's,
    ``segment`` elements (whole rows of a 2-D ``out``) at a time."""
    grad, momentum = grad.view(out.shape), momentum.view(out.shape)
    rows = _rows(out, segment)
    for o, g, m in zip(out.split(rows), grad.split(rows), momentum.split(rows)):
        if hyper.nesterov:
            torch.add(g, m, alpha=hyper.momentum, out=o)
        else:
            o.copy_(m)


def segment_for(buffer: torch.Tensor) -> int:
    """Elements per segment for ``buffer``: an eighth of it; on CPU, where the mixed-precision ops compute
    through temporaries, at most :data:`CPU_SEGMENT` (the temporary stays in cache: measured 1.4-1.9x faster
    than a segment of 393K elements)."""
    segment = max(LARGE_MATRIX, buffer.numel() // SEGMENT_FRACTION)
    return min(segment, CPU_SEGMENT) if buffer.device.type == "cpu" else segment


def _rows(tensor: torch.Tensor, segment: int) -> int:
    return max(1, segment // (tensor[0].numel() if tensor.ndim > 1 else 1))


def add_(targets: list[torch.Tensor], updates: list[torch.Tensor], alpha: float, segment: int) -> None:
    """targets += alpha updates, one foreach, pairs cut into ``segment``-element pieces: on CPU a
    foreach add of an NS-dtype update to float32 weights copies the update to float32 first."""
    cut_targets, cut_updates = [], []
    for target, update in zip(targets, updates):
        if update.numel() <= segment:
            cut_targets.append(target)
            cut_updates.append(update)
        else:
            rows = _rows(update, segment)
            cut_targets.extend(target.split(rows))
            cut_updates.extend(update.split(rows))
    if cut_targets:
        torch._foreach_add_(cut_targets, cut_updates, alpha=alpha)


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
    flat, g_flat, m_flat = _Flat(params, True), _Flat(grads, False), _Flat(momenta, True)
    momentum_([m for m in momenta if m is not None], [g for g in grads if g is not None], hyper.momentum)
    send = torch.empty(sum(route.gather.send_sizes), dtype=dtype, device=device)
    segment = segment_for(send)
    for tensor, offset, at, numel in route.send:
        direction_into(send[at:at + numel], g_flat[tensor][offset:offset + numel],
                       m_flat[tensor][offset:offset + numel], hyper, segment)
    received, gathering = _start(route.gather, send, dtype, device, group)
    del send
    decayed = [p for p in params if p is not None]
    if hyper.weight_decay and decayed:  # a rank may hold none of the group's tensors
        torch._foreach_mul_(decayed, 1.0 - hyper.lr * hyper.weight_decay)
    give = torch.empty(sum(route.scatter.send_sizes), dtype=dtype, device=device)
    results, scattering = None, None
    for number, batch in enumerate(route.batches):
        if number == route.giving:  # every result other ranks hold is in ``give`` now
            results, scattering = _start(route.scatter, give, dtype, device, group)
        if batch.waits and gathering is not None:
            gathering.wait()
            gathering = None
        buffer = torch.empty(len(batch.keys), *batch.shape, dtype=dtype, device=device)
        _fill(buffer, batch.local, grads, momenta, g_flat, m_flat, hyper)
        _receive(buffer, batch.receive, received)
        result = orthogonalize_(buffer)
        _apply(result, batch.local, params, flat, -hyper.lr * hyper.scale(batch.shape))
        _give(result, batch.give, give)
        del buffer, result  # before the next batch's buffer exists
    if gathering is not None:
        gathering.wait()
    if results is None:
        results, scattering = _start(route.scatter, give, dtype, device, group)
    if scattering is not None:
        scattering.wait()
    segment = segment_for(results)
    for shape, runs in route.get.items():
        add_([flat[t][offset:offset + numel] for t, offset, _at, numel in runs],
             [results[at:at + numel] for _t, _offset, at, numel in runs], -hyper.lr * hyper.scale(shape), segment)


class _Flat:
    """The group's tensors flattened, each on first use (a step touching whole tensors needs none).
    Tensors written to must be views (``writable``); gradients may be copied."""

    def __init__(self, tensors: list[Optional[torch.Tensor]], writable: bool) -> None:
        self.tensors = tensors
        self.writable = writable
        self.flat: dict[int, torch.Tensor] = {}

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.flat:
            tensor = self.tensors[index]
            self.flat[index] = tensor.view(-1) if self.writable else tensor.reshape(-1)
        return self.flat[index]


def _spans(batch: torch.Tensor, moves: Moves) -> Iterator[tuple[torch.Tensor, int, int, int]]:
    """The batch's runs and sub-block pieces, each as (view of ``batch``, tensor, [start, stop) of that
    tensor's flat storage): what every stage that moves elements between a batch and flat storage walks."""
    elements = batch.view(-1)
    for tensor, offset, at, numel in moves.runs:
        yield elements[at:at + numel], tensor, offset, offset + numel
    for i, piece, tensor, offset in moves.blocks:
        for view, lo, hi in piece_views(batch[i], piece):
            yield view, tensor, offset + lo, offset + hi


def _fill(buffer: torch.Tensor, moves: Moves, grads: list[torch.Tensor], momenta: list[torch.Tensor],
          g_flat: _Flat, m_flat: _Flat, hyper: Hyper) -> None:
    """The batch's local pieces: Nesterov directions written into the NS-dtype ``buffer``."""
    segment = segment_for(buffer)
    if moves.whole:
        matrices = buffer.unbind(0)
        per = max(1, segment // matrices[0].numel())  # matrices whose float32 directions exist at once
        for first in range(0, len(moves.whole), per):
            chunk = moves.whole[first:first + per]
            targets = [matrices[i] for i, _t in chunk]
            momentum = [momenta[t] for _i, t in chunk]
            directions = (torch._foreach_add([grads[t] for _i, t in chunk], momentum, alpha=hyper.momentum)
                          if hyper.nesterov else momentum)
            torch._foreach_copy_(targets, directions)  # rounded once to the NS dtype
    for view, tensor, start, stop in _spans(buffer, moves):
        direction_into(view, g_flat[tensor][start:stop], m_flat[tensor][start:stop], hyper, segment)


def _receive(buffer: torch.Tensor, moves: Moves, received: torch.Tensor) -> None:
    """Pieces from the gather's receive buffer into the (N, A, B) ``buffer``."""
    for view, _tensor, start, stop in _spans(buffer, moves):
        view.copy_(received[start:stop].view(view.shape))


def _give(result: torch.Tensor, moves: Moves, give: torch.Tensor) -> None:
    """Pieces of the (N, A, B) ``result`` other ranks hold, into the scatter's send buffer."""
    for view, _tensor, start, stop in _spans(result, moves):
        give[start:stop].view(view.shape).copy_(view)


def _apply(result: torch.Tensor, moves: Moves, params: list[torch.Tensor], flat: _Flat, alpha: float) -> None:
    """W <- W + alpha O for this rank's pieces of the batch: small whole matrices as one foreach, runs and
    sub-block pieces in segments."""
    if moves.whole:
        matrices = result.unbind(0)
        torch._foreach_add_([params[t] for _i, t in moves.whole], [matrices[i] for i, _t in moves.whole], alpha=alpha)
    spans = list(_spans(result, moves))
    add_([flat[tensor][start:stop].view(view.shape) for view, tensor, start, stop in spans],
         [view for view, _tensor, _start, _stop in spans], alpha, segment_for(result))
