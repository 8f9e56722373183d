"""Which logical matrices a megatron-core parameter holds, as :class:`~muon_ds.matrices.MatrixView` s.

Megatron stores a matrix as this rank's tensor-parallel shard (rows split for column-parallel
layers, columns for row-parallel ones), fuses SwiGLU's gate and up projections into one fc1
(TP layout: :mod:`muon_ds.glu_layout`), fuses q/k/v per query group, and
numbers experts locally per expert-parallel rank. Moonlight orthogonalizes each logical matrix
(gate, up, each expert, each MLA projection) whole, so every view names the logical matrix by a
key that is identical on every rank holding a piece of it and gives this rank's block of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from muon_ds.glu_layout import glu_segments
from muon_ds.matrices import Block, MatrixView, Views

# Moonlight trains these with AdamW (embeddings, output head, MoE router), whatever their shape.
ADAMW_NAMES = re.compile(r"(^|\.)(embedding|word_embeddings|position_embeddings|output_layer)\.|"
                         r"(^|\.)router\.weight$")
_LOCAL_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(\.)")
_TE_GROUPED_EXPERT = re.compile(r"(\.experts\.linear_fc[12]\.weight)(\d+)$")
_LEGACY_GROUPED = re.compile(r"\.experts\.weight[12]$")
TP_MODES = ("distributed", "duplicated", "blockwise")


@dataclass(frozen=True)
class Sharding:
    """How this rank's copy of a parameter relates to the logical matrices."""

    tp_rank: int = 0
    tp_size: int = 1
    expert_offset: int = 0  # global index of this rank's first local expert
    tp_mode: str = "distributed"  # "blockwise": each TP shard is its own matrix
    split_qkv: bool = True
    gated_linear_unit: bool = False
    qkv_split: Optional[tuple[int, int, int]] = None  # rows of q, k, v per query group (non-MLA attention)


def global_name(name: str, expert_offset: int) -> str:
    """The parameter name with local expert numbers made global (the same on every EP rank)."""
    name = _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}{m.group(3)}", name)
    return _TE_GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + expert_offset}", name)


def is_adamw_name(name: str, param: torch.Tensor) -> bool:
    """Embeddings, the output head and routers: AdamW in Moonlight."""
    return bool(getattr(param, "is_embedding_or_output_parameter", False) or ADAMW_NAMES.search(name))


def _row_segments(name: str, rows: int, sharding: Sharding, tp_rank: int, tp_size: int
                  ) -> list[tuple[str, int, int, int, int]]:
    """(suffix, local first row, row count, logical rows, logical first row) of each fused part."""
    if name.endswith("linear_fc1.weight") and sharding.gated_linear_unit:
        try:
            segments = glu_segments(rows, tp_size, tp_rank)
        except ValueError as err:
            raise ValueError(f"parameter {name!r}: {err}") from None
        return [(f".{part}", *rest) for part, *rest in segments]
    if name.endswith("linear_qkv.weight") and sharding.split_qkv and sharding.qkv_split is not None:
        per_group = sum(sharding.qkv_split)
        if rows % per_group:
            raise ValueError(f"parameter {name!r}: {rows} rows are not whole query groups of {per_group}")
        groups = rows // per_group
        segments = []
        for g in range(groups):
            start = g * per_group
            for part, size in zip(("q", "k", "v"), sharding.qkv_split):
                segments.append((f".{part}", start, size, size * groups * tp_size, (tp_rank * groups + g) * size))
                start += size
        return segments
    return [("", 0, rows, rows * tp_size, tp_rank * rows)]


def megatron_views(name: str, param: torch.Tensor, sharding: Sharding) -> Optional[Views]:
    """This rank's blocks of the logical matrices in ``param`` (None: AdamW trains it)."""
    if is_adamw_name(name, param) or param.dim() != 2:
        return None
    if _LEGACY_GROUPED.search(name):
        raise NotImplementedError(
            f"parameter {name!r}: the legacy GroupedMLP keeps all experts' fc1 in one tensor with gate and up "
            "interleaved by column, which muon_ds cannot split into matrices; use TransformerEngine grouped "
            "experts (--moe-grouped-gemm without --moe-use-legacy-grouped-gemm) or SequentialMLP")
    key = global_name(name, sharding.expert_offset)
    rows, cols = param.shape
    sharded = bool(getattr(param, "tensor_model_parallel", False)) and sharding.tp_size > 1
    dim = int(getattr(param, "partition_dim", -1)) if sharded else -1
    if sharded and dim not in (0, 1):
        raise ValueError(f"parameter {name!r} is tensor-parallel along dim {dim}; expected 0 or 1")
    tp_rank, tp_size = sharding.tp_rank, sharding.tp_size
    if sharding.tp_mode == "blockwise" and sharded:
        key, sharded, dim, tp_rank, tp_size = f"{key}@tp{sharding.tp_rank}", False, -1, 0, 1
    if dim != 0:
        tp_rank, tp_size = 0, 1  # rows are whole on this rank
    col_start, full_cols = (sharding.tp_rank * cols, cols * sharding.tp_size) if dim == 1 else (0, cols)
    views = []
    for suffix, local_row, count, full_rows, row_start in _row_segments(name, rows, sharding, tp_rank, tp_size):
        block = Block(row_start, row_start + count, col_start, col_start + cols)
        views.append(MatrixView(key + suffix, (full_rows, full_cols), local_row * cols, block))
    return tuple(views)
