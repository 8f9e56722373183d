"""The fused SwiGLU fc1 layout under tensor parallelism (used by the optimizer views, the converter and the
tests; the Megatron layout tests check it against megatron-core's own TP=2 forward and backward)."""

import pytest
import torch

from muon_ds.glu_layout import glu_segments, shard_glu, unshard_glu


def test_each_rank_holds_its_gate_rows_then_its_up_rows() -> None:
    gate, up = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14.0).view(4, 1)
    assert shard_glu(gate, up, tp_size=2, tp_rank=1).flatten().tolist() == [2.0, 3.0, 12.0, 13.0]
    assert glu_segments(4, tp_size=2, tp_rank=1) == [("gate", 0, 2, 4, 2), ("up", 2, 2, 4, 2)]
    back = unshard_glu([shard_glu(gate, up, 2, r) for r in range(2)])
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_odd_shard_is_refused() -> None:
    with pytest.raises(ValueError, match="even row count, has 5"):
        glu_segments(5, tp_size=1, tp_rank=0)
