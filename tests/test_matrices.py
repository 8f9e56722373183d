"""Classification: which logical matrices each parameter holds."""

import pytest
import torch

from muon_ds.matrices import MatrixView, assign, classify


def shape_of(name: str, *shape: int) -> list:
    views = classify(name, torch.zeros(shape))
    return None if views is None else [(v.key, v.shape, v.offset) for v in views]


@pytest.mark.parametrize("name,shape", [
    ("model.embed_tokens.weight", (10, 4)), ("lm_head.weight", (10, 4)), ("output_layer.weight", (10, 4)),
    ("model.layers.1.mlp.gate.weight", (8, 4)), ("decoder.layers.0.mlp.router.weight", (8, 4)),
    ("moe.deepspeed_moe.gate.wg.weight", (8, 4)), ("norm.weight", (4,)), ("proj.bias", (4,)),
])
def test_adamw_parameters(name: str, shape: tuple) -> None:
    assert shape_of(name, *shape) is None


def test_plain_matrix_is_one_matrix() -> None:
    assert shape_of("layers.0.self_attn.q_proj.weight", 6, 4) == [("layers.0.self_attn.q_proj.weight", (6, 4), 0)]


def test_stacked_experts_are_separate_matrices() -> None:
    assert shape_of("experts.down_proj", 3, 4, 5) == [
        ("experts.down_proj[0]", (4, 5), 0), ("experts.down_proj[1]", (4, 5), 20), ("experts.down_proj[2]", (4, 5), 40)]


def test_fused_gate_up_is_split_per_expert() -> None:
    assert shape_of("mlp.experts.gate_up_proj", 2, 8, 3) == [
        ("mlp.experts.gate_up_proj[0].0", (4, 3), 0), ("mlp.experts.gate_up_proj[0].1", (4, 3), 12),
        ("mlp.experts.gate_up_proj[1].0", (4, 3), 24), ("mlp.experts.gate_up_proj[1].1", (4, 3), 36)]


def test_override_and_use_muon_tag_win_over_the_rules() -> None:
    embed = torch.nn.Parameter(torch.zeros(10, 4))
    assign(embed, [MatrixView.whole("embed", (10, 4))])
    assert classify("embed_tokens.weight", embed)[0].shape == (10, 4)
    hidden = torch.nn.Parameter(torch.zeros(4, 4))
    hidden.use_muon = False
    assert classify("layers.0.weight", hidden) is None


def test_non_matrix_tagged_for_muon_is_an_error() -> None:
    bias = torch.nn.Parameter(torch.zeros(4))
    bias.use_muon = True
    with pytest.raises(ValueError, match="'proj.bias' of shape \\(4,\\) is tagged use_muon=True"):
        classify("proj.bias", bias)


def test_matrices_must_tile_the_parameter() -> None:
    p = torch.nn.Parameter(torch.zeros(4, 4))
    assign(p, [MatrixView.whole("a", (2, 4))])
    with pytest.raises(ValueError, match="has 16 elements but its matrices cover 8"):
        classify("w", p)
    assign(p, [MatrixView.whole("a", (2, 4)), MatrixView.whole("b", (2, 4), offset=4)])
    with pytest.raises(ValueError, match="gap or overlap"):
        classify("w", p)
