"""Which logical matrices a parameter holds: the one description both engines give the optimizer.

A parameter (or the piece of it a rank holds) contains zero or more logical matrices, each with
its full shape A x B. A plain Linear weight is one matrix; stacked experts (E x A x B) are E
matrices; a fused gate/up projection is two; a tensor-parallel shard holds a block of one. A
parameter with no matrices is trained by AdamW.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

ATTRIBUTE = "muon_ds_matrices"


@dataclass(frozen=True)
class Block:
    """Rows [row_start, row_stop) x columns [col_start, col_stop) of a logical matrix."""

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @classmethod
    def whole(cls, shape: tuple[int, int]) -> "Block":
        return cls(0, shape[0], 0, shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.row_stop - self.row_start, self.col_stop - self.col_start)

    @property
    def numel(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def overlaps(self, other: "Block") -> bool:
        return (self.row_start < other.row_stop and other.row_start < self.row_stop
                and self.col_start < other.col_stop and other.col_start < self.col_stop)


@dataclass(frozen=True)
class MatrixView:
    """A block of logical matrix ``key`` (full shape ``shape``), stored row-major from ``offset``."""

    key: str
    shape: tuple[int, int]
    offset: int
    block: Block

    @classmethod
    def whole(cls, key: str, shape: tuple[int, int], offset: int = 0) -> "MatrixView":
        return cls(key, (int(shape[0]), int(shape[1])), offset, Block.whole(shape))

    @property
    def numel(self) -> int:
        return self.block.numel


Views = tuple[MatrixView, ...]
LayoutRule = Callable[[str, torch.Size], Optional[Views]]


def adamw(name: str, shape: torch.Size) -> None:
    """Not a hidden matrix: AdamW trains it."""
    return None


def by_dimensions(name: str, shape: torch.Size) -> Optional[Views]:
    """2-D: one matrix; 3-D: stacked matrices (experts), one per leading index; else AdamW."""
    if len(shape) == 2:
        return (MatrixView.whole(name, (shape[0], shape[1])),)
    if len(shape) == 3:
        count, rows, cols = shape
        return tuple(MatrixView.whole(f"{name}[{i}]", (rows, cols), i * rows * cols) for i in range(count))
    return None


def split_rows(parts: int) -> LayoutRule:
    """A fused projection stacking ``parts`` equal matrices along rows (gate/up, q/k/v), per expert."""

    def rule(name: str, shape: torch.Size) -> Optional[Views]:
        stacked = by_dimensions(name, shape)
        if stacked is None:
            return None
        rows, cols = stacked[0].shape
        if rows % parts:
            raise ValueError(f"parameter {name!r}: {rows} rows do not split into {parts} fused matrices")
        size = rows // parts
        return tuple(MatrixView.whole(f"{view.key}.{j}", (size, cols), view.offset + j * size * cols)
                     for view in stacked for j in range(parts))

    return rule


# First match wins. Embeddings, output heads and MoE routers are AdamW, as in Moonlight.
DEFAULT_RULES: tuple[tuple[str, LayoutRule], ...] = (
    (r"embed|(^|\.)(wte|wpe|lm_head|output_layer)(\.|$)", adamw),
    (r"(^|\.)(router|gate\.wg)\.|(^|\.)mlp\.gate\.weight$", adamw),
    (r"gate_up_proj$", split_rows(2)),
    (r"", by_dimensions),
)


def assign(param: torch.Tensor, views: Union[Sequence[MatrixView], None]) -> None:
    """Override the rules for one parameter: its matrices, or ``None`` for AdamW."""
    setattr(param, ATTRIBUTE, None if views is None else tuple(views))


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's logical shape. A tensor DeepSpeed partitions in place (ZeRO-3, ``zero.Init``) is
    empty on every rank and keeps its shape as ``ds_shape``; classifying the empty tensor would send every
    matrix to AdamW."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def classify(name: str, param: torch.Tensor,
             rules: Sequence[tuple[str, LayoutRule]] = DEFAULT_RULES) -> Optional[Views]:
    """The matrices ``param`` holds (None: AdamW), from an override, DeepSpeed's ``use_muon`` tag, or the rules."""
    if hasattr(param, ATTRIBUTE):
        views = getattr(param, ATTRIBUTE)
        if views is not None:
            check_coverage(name, param, views)
        return views
    if hasattr(param, "use_muon"):
        if not param.use_muon:
            return None
        views = by_dimensions(name, full_shape(param))
        if views is None:
            raise ValueError(f"parameter {name!r} of shape {tuple(full_shape(param))} is tagged use_muon=True "
                             "but is not a matrix (Muon needs 2-D, or 3-D stacked, parameters)")
        return views
    for pattern, rule in rules:
        if re.search(pattern, name):
            return rule(name, full_shape(param))
    return None


def check_coverage(name: str, param: torch.Tensor, views: Sequence[MatrixView]) -> None:
    """A parameter given to Muon must be exactly tiled by 2-D matrix blocks."""
    if not views:
        raise ValueError(f"parameter {name!r}: an empty matrix list; use None to train it with AdamW")
    spans = sorted((v.offset, v.offset + v.numel, v) for v in views)
    cursor = 0
    for start, stop, view in spans:
        if len(view.shape) != 2 or min(view.shape) < 1:
            raise ValueError(f"parameter {name!r}: matrix {view.key!r} has shape {view.shape}, not a 2-D matrix")
        if start != cursor:
            raise ValueError(f"parameter {name!r}: matrices leave a gap or overlap at element {cursor}")
        cursor = stop
    numel = math.prod(full_shape(param))
    if cursor != numel:
        raise ValueError(f"parameter {name!r} has {numel} elements but its matrices cover {cursor}; "
                         "a parameter tagged for Muon must consist of whole matrices")
