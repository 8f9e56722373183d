"""Megatron's fused SwiGLU fc1 under tensor parallelism: the one definition of its row layout.

megatron-core fuses the gate and up projections of a gated MLP into one ``linear_fc1`` and
shards that over the TP ranks so that each rank holds ``[its block of gate rows; its block of up
rows]`` (not a block of ``[gate; up]``). The optimizer's matrix views, the checkpoint converter
and the tests all take the layout from here.
"""

from __future__ import annotations

import torch

PARTS = ("gate", "up")


def glu_segments(local_rows: int, tp_size: int, tp_rank: int) -> list[tuple[str, int, int, int, int]]:
    """(part, first local row, row count, logical rows, first logical row) of gate and up in one TP shard
    of ``local_rows`` rows."""
    if local_rows % 2:
        raise ValueError(f"a fused gate/up shard needs an even row count, has {local_rows}")
    half = local_rows // 2
    return [(part, i * half, half, half * tp_size, tp_rank * half) for i, part in enumerate(PARTS)]


def shard_glu(gate: torch.Tensor, up: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s fc1 shard (a new tensor) from the full gate and up matrices."""
    return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)


def unshard_glu(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The full gate and up matrices from every TP rank's fc1 shard, in rank order."""
    halves = [shard.chunk(2, dim=0) for shard in shards]
    return torch.cat([g for g, _ in halves], dim=0), torch.cat([u for _, u in halves], dim=0)
