"""The Megatron adapter's pure parts: ``--muon-*`` values and defaults, matrix views of Megatron's layouts,
and the clear errors (bad value, a non-matrix forced to Muon, an unsupported megatron-core)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

from muon_ds.matrices import Block  # noqa: E402
from muon_ds.megatron import (  # noqa: E402
    MuonSettings,
    add_arguments,
    apply_moonlight_defaults,
    check_megatron_core,
    moonlight_optimizer_config,
)
from muon_ds.megatron.optimizer import describe_matrices  # noqa: E402
from muon_ds.megatron.version import NESTEROV  # noqa: E402
from muon_ds.megatron.views import Sharding, global_name, megatron_views  # noqa: E402


def _megatron_defaults() -> SimpleNamespace:
    """Megatron-LM's argparse defaults for the muon flags (core_v0.16.1 and core_v0.19.0 agree but for the
    Nesterov flag's name)."""
    return SimpleNamespace(muon_momentum=0.9, muon_split_qkv=True, muon_scale_mode="spectral",
                           muon_fp32_matmul_prec="medium", muon_num_ns_steps=5, muon_tp_mode="blockwise",
                           muon_extra_scale_factor=1.0, rank=0, **{NESTEROV.attribute: False})


def test_moonlight_defaults_replace_megatrons_unless_given() -> None:
    args = apply_moonlight_defaults(_megatron_defaults(), argv=["--optimizer", "muon"])
    settings = MuonSettings.from_config(args)
    assert (settings.momentum, settings.nesterov, settings.tp_mode) == (0.95, True, "distributed")
    assert settings.core_scale == ("moonlight", 1.0)  # 0.2 x sqrt(max(A, B))
    explicit = _megatron_defaults()
    explicit.muon_momentum, explicit.muon_tp_mode = 0.8, "blockwise"
    args = apply_moonlight_defaults(explicit, argv=["--muon-momentum=0.8", "--muon-tp-mode", "blockwise"])
    assert (args.muon_momentum, args.muon_tp_mode, getattr(args, NESTEROV.attribute)) == (0.8, "blockwise", True)


def test_distributed_optimizer_checkpoints_are_marked_fully_reshardable() -> None:
    """Megatron-LM refuses to resume at another TP/PP size unless the checkpoint's metadata says
    'fully_reshardable', which muon_ds's model-space state always is (test_resume_at_another_tp_size)."""
    args = _megatron_defaults()
    args.use_distributed_optimizer, args.dist_ckpt_optim_fully_reshardable = True, False
    assert apply_moonlight_defaults(args, argv=[]).dist_ckpt_optim_fully_reshardable is True
    local = _megatron_defaults()  # Megatron-LM's local (non-persistent) checkpoints refuse that type
    local.use_distributed_optimizer, local.dist_ckpt_optim_fully_reshardable = True, False
    local.non_persistent_ckpt_type = "local"
    assert apply_moonlight_defaults(local, argv=[]).dist_ckpt_optim_fully_reshardable is False


def test_no_nesterov_flag_is_registered() -> None:
    parser = add_arguments(argparse.ArgumentParser())
    assert getattr(parser.parse_args([NESTEROV.off_flag]), NESTEROV.attribute) is False


@pytest.mark.parametrize("field, value, flag", [
    ("muon_momentum", 1.0, "--muon-momentum"),
    ("muon_num_ns_steps", 0, "--muon-num-ns-steps"),
    ("muon_scale_mode", "rms", "--muon-scale-mode"),
    ("muon_tp_mode", "sideways", "--muon-tp-mode"),
    ("muon_fp32_matmul_prec", "max", "--muon-fp32-matmul-prec"),
    ("muon_extra_scale_factor", -1.0, "--muon-extra-scale-factor"),
    ("muon_scale_mode", "unit_rms_norm", "--muon-scale-mode"),
])
def test_bad_muon_value_is_named(field: str, value: object, flag: str) -> None:
    config = _megatron_defaults()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=flag):
        MuonSettings.from_config(config)


def test_scale_modes_map_to_muon_ds() -> None:
    config = _megatron_defaults()
    assert MuonSettings.from_config(config).core_scale == ("moonlight", 5.0)  # Megatron's sqrt(max(A, B)) x 1
    config.muon_scale_mode = "shape_scaling"  # sqrt(max(1, A / B)), the same word in both
    assert MuonSettings.from_config(config).core_scale == ("shape_scaling", 1.0)


def test_python_route_gets_the_command_lines_moonlight_settings() -> None:
    """moonlight_optimizer_config (Python) and apply_moonlight_defaults (command line) agree, overrides win."""
    config = moonlight_optimizer_config(lr=2e-4, weight_decay=0.1, muon_num_ns_steps=6)
    assert (config.optimizer, config.lr, config.weight_decay) == ("muon", 2e-4, 0.1)
    parsed = _megatron_defaults()
    parsed.muon_num_ns_steps = 6  # as argparse sets it from the flag
    cli = MuonSettings.from_config(apply_moonlight_defaults(parsed, argv=["--muon-num-ns-steps", "6"]))
    assert MuonSettings.from_config(config) == cli
    assert MuonSettings.from_config(config).off_moonlight(tp_size=8) == []
    with pytest.raises(ValueError, match="--muon-tp-mode"):
        moonlight_optimizer_config(muon_tp_mode="sideways")


def test_megatron_core_dataclass_defaults_are_named_as_not_moonlight() -> None:
    """OptimizerConfig(optimizer="muon") alone: blockwise TP Newton-Schulz and 5x Moonlight's scale."""
    from megatron.core.optimizer import OptimizerConfig

    settings = MuonSettings.from_config(OptimizerConfig(optimizer="muon"))
    tp2 = settings.off_moonlight(tp_size=2)
    assert len(tp2) == 2 and "blockwise" in tp2[0] and "spectral x 1" in tp2[1]
    assert len(settings.off_moonlight(tp_size=1)) == 1  # blockwise is whole-matrix at TP=1


def _param(rows: int, cols: int, partition_dim: int = -1) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(rows, cols))
    if partition_dim >= 0:
        param.tensor_model_parallel, param.partition_dim = True, partition_dim
    return param


def test_gated_fc1_shard_holds_a_block_of_gate_and_of_up() -> None:
    """TP rank 1 of 2 holds [gate rows 3..5; up rows 3..5] of a 6 x 4 gate and a 6 x 4 up."""
    views = megatron_views("decoder.layers.0.mlp.linear_fc1.weight", _param(6, 4, 0),
                           Sharding(tp_rank=1, tp_size=2, gated_linear_unit=True))
    assert [(v.key, v.shape, v.offset, v.block) for v in views] == [
        ("decoder.layers.0.mlp.linear_fc1.weight.gate", (6, 4), 0, Block(3, 6, 0, 4)),
        ("decoder.layers.0.mlp.linear_fc1.weight.up", (6, 4), 12, Block(3, 6, 0, 4)),
    ]


def test_row_parallel_shard_is_a_column_block_and_blockwise_is_its_own_matrix() -> None:
    full = megatron_views("x.linear_proj.weight", _param(4, 3, 1), Sharding(tp_rank=1, tp_size=2))
    assert [(v.shape, v.block) for v in full] == [((4, 6), Block(0, 4, 3, 6))]
    block = megatron_views("x.linear_proj.weight", _param(4, 3, 1), Sharding(tp_rank=1, tp_size=2, tp_mode="blockwise"))
    assert [(v.key, v.shape, v.block) for v in block] == [("x.linear_proj.weight@tp1", (4, 3), Block(0, 4, 0, 3))]


def test_qkv_split_per_query_group() -> None:
    """Two query groups on this rank (of four), each [q(2 rows), k(1), v(1)]."""
    views = megatron_views("l.self_attention.linear_qkv.weight", _param(8, 5, 0),
                           Sharding(tp_rank=1, tp_size=2, qkv_split=(2, 1, 1)))
    q = [(v.offset, v.block.row_start, v.shape) for v in views if v.key.endswith(".q")]
    assert q == [(0, 4, (8, 5)), (20, 6, (8, 5))]


def test_experts_get_global_numbers_and_routers_embeddings_go_to_adamw() -> None:
    assert global_name("l.mlp.experts.local_experts.1.linear_fc2.weight", 2) == \
        "l.mlp.experts.local_experts.3.linear_fc2.weight"
    assert global_name("l.mlp.experts.linear_fc1.weight1", 4) == "l.mlp.experts.linear_fc1.weight5"
    for name in ("decoder.layers.1.mlp.router.weight", "embedding.word_embeddings.weight", "output_layer.weight"):
        assert megatron_views(name, _param(4, 4), Sharding()) is None


def test_legacy_grouped_mlp_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="experts.weight1"):
        megatron_views("l.mlp.experts.weight1", _param(4, 8), Sharding())


class _Chunk(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_moe_experts=None, multi_latent_attention=True, gated_linear_unit=False)
        self.proj = torch.nn.Linear(4, 4, bias=False)
        self.input_layernorm = torch.nn.LayerNorm(4)


def test_pattern_forcing_a_non_matrix_to_muon_is_named() -> None:
    settings = MuonSettings.from_config(apply_moonlight_defaults(_megatron_defaults(), argv=[]))
    groups = SimpleNamespace(tp=None, expt_tp=None, ep=None)
    with pytest.raises(ValueError, match="input_layernorm.weight"):
        describe_matrices([_Chunk()], settings, groups, matrix_params=r"layernorm")


def test_unsupported_megatron_core_version_is_named() -> None:
    for refused in ("0.15.0", "0.17.0", "0.20.0"):
        with pytest.raises(RuntimeError, match=f">=0.16.0,<0.17.0 or >=0.19.0,<0.20.0; found megatron-core {refused}"):
            check_megatron_core(refused)
    for supported in ("0.16.1", "0.19.0", "0.19.2+abc"):
        check_megatron_core(supported)


def test_factory_takes_megatron_cores_arguments() -> None:
    """A drop-in for megatron.core.optimizer.get_megatron_optimizer: same parameters, in order, same defaults."""
    import inspect

    from megatron.core.optimizer import get_megatron_optimizer as megatron_factory

    from muon_ds.megatron import get_megatron_optimizer

    ours = list(inspect.signature(get_megatron_optimizer).parameters.values())
    theirs = list(inspect.signature(megatron_factory).parameters.values())
    assert [(p.name, p.default) for p in ours[:len(theirs)]] == [(p.name, p.default) for p in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs):])


def test_torch_format_file_of_another_optimizer_or_model_is_refused() -> None:
    """--ckpt-format torch: a distrib_optim.pt in megatron-core Adam's layout, or of other buffer sizes, is
    named before anything is scattered (DP rank 0 decides, every rank raises)."""
    from muon_ds.megatron.checkpoint import MuonDistributedOptimizer as Optimizer

    this_run = SimpleNamespace(TORCH_FORMAT=Optimizer.TORCH_FORMAT, TORCH_STATE_KEYS=Optimizer.TORCH_STATE_KEYS,
                               buffers=[SimpleNamespace(numel_unpadded=10)])
    adam = {"buckets_coalesced": True, 0: {(torch.float32, torch.float32): {
        "param": torch.zeros(10), "exp_avg": torch.zeros(10), "exp_avg_sq": torch.zeros(10), "numel_unpadded": 10}}}
    assert "not written by muon_ds's Muon" in Optimizer._torch_format_problem(this_run, adam)
    ours = {"format": Optimizer.TORCH_FORMAT, "buffers": [{k: torch.zeros(10) for k in Optimizer.TORCH_STATE_KEYS}]}
    assert Optimizer._torch_format_problem(this_run, ours) is None
    this_run.buffers[0].numel_unpadded = 12
    assert "this run 12" in Optimizer._torch_format_problem(this_run, ours)
