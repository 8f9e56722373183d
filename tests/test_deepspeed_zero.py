"""DeepSpeed ZeRO 0/1/2 with "type": "Muon" on 1-4 CPU ranks equals one process on the same global batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed import run_ranks
from tests.ds_scenarios import (TAGGED_ADAMW, initial_weights, reference_weights, update_error)

FLOAT32_ROUNDING = 1e-4  # measured: about 5e-6; a cut matrix orthogonalized in fragments gives about 0.7
# measured 2026-12-01: 0.0603 (W=1) and 0.0604 (W=2), bf16 weights and forward against the fp32 reference
BF16_ROUNDING = 0.08
RUNS = {
    1: ["s0_ga1", "s1_ga1", "s2_ga1", "errors", "moe_s0", "layout_s1", "s1_bf16", "s1_bf16_fp32_accumulation"],
    2: ["s0_ga1", "s1_ga1", "s2_ga1", "s0_ga2", "s1_ga2", "s2_ga2", "s1_no_reduce_scatter",
        "s2_no_reduce_scatter", "s0_clip", "s1_clip", "s2_clip", "control", "nan_skip_s0", "nan_skip_s1",
        "nan_skip_s2_bf16", "resume_s1_fp32", "resume_s2_bf16", "tagged_s2", "moe_s1", "moe_s2", "moe_ep2_s1",
        "moe_ep2_s2", "frozen", "s0_scattered", "layout_s1", "s1_bf16", "s1_bf16_fp32_accumulation"],
    3: ["s0_ga1", "s1_ga1", "s2_ga1", "s1_ga2", "s2_ga2", "control", "layout_s1", "elsewhere_s1_fp32"],
    4: ["s1_ga1", "s2_ga1", "s2_ga2", "layout_s1"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """Every scenario, one launch per world size (W=3 loads the checkpoint W=2 saved)."""
    out: Path = tmp_path_factory.mktemp("deepspeed")
    results, logs = {}, {}
    for world, names in RUNS.items():
        logs[world] = run_ranks(world, "tests.ds_worker", str(out), *names)[0]
        results[world] = torch.load(out / f"w{world}.pt", weights_only=False)
        results[world]["log"] = logs[world]
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return reference_weights()


def equal_runs() -> list[tuple[int, str]]:
    return [(w, n) for w, names in RUNS.items() for n in names
            if n.startswith("s") and "clip" not in n and "bf16" not in n]


@pytest.mark.parametrize("world,name", equal_runs())
def test_zero_equals_single_process(runs: dict, reference: dict, world: int, name: str) -> None:
    assert update_error(runs[world][name], reference, initial_weights()) < FLOAT32_ROUNDING


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name,wrapper", [("s1_bf16", "DeepSpeedZeroOptimizer"),
                                          ("s1_bf16_fp32_accumulation", "BF16_Optimizer")])
def test_bf16_follows_the_fp32_reference(runs: dict, reference: dict, world: int, name: str, wrapper: str) -> None:
    assert update_error(runs[world][name], reference, initial_weights()) < BF16_ROUNDING
    assert f"under ZeRO stage 1 [{wrapper}]" in runs[world]["log"]


@pytest.mark.parametrize("world", [2, 3])
def test_orthogonalizing_fragments_separately_is_detected(runs: dict, reference: dict, world: int) -> None:
    assert update_error(runs[world]["control"], reference, initial_weights()) > 1e-2


@pytest.mark.parametrize("name", ["s0_clip", "s1_clip", "s2_clip"])
def test_gradient_clipping_matches_torch_clipping(runs: dict, name: str) -> None:
    clipped = reference_weights(clip=0.05)
    assert update_error(runs[2][name], clipped, initial_weights()) < FLOAT32_ROUNDING
    assert update_error(runs[2][name], reference_weights(), initial_weights()) > 1e-2  # clipping did act


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matrices_are_cut_and_only_cut_matrices_move(runs: dict, world: int) -> None:
    stats = runs[world]["layout_s1"]
    assert stats["cut_matrices"] >= 1
    assert stats["moved_numel"] <= 2 * stats["cut_numel"]
    total = sum(stats["matrix_flops"])
    assert sum(stats["flops"]) == total
    assert max(stats["flops"]) <= 1.25 * total / world + max(stats["matrix_flops"])
    busy = sum(f > 0 for f in stats["flops"])
    assert busy == min(world, len(stats["matrix_flops"]))  # the work is spread over the ranks


def test_single_rank_moves_nothing(runs: dict) -> None:
    assert runs[1]["layout_s1"]["moved_numel"] == 0


@pytest.mark.parametrize("name", ["nan_skip_s0", "nan_skip_s1", "nan_skip_s2_bf16"])
def test_non_finite_gradient_skips_step_and_keeps_momentum(runs: dict, name: str) -> None:
    result = runs[2][name]
    assert result["weights_same"] and result["momentum_same"]
    assert result["moved"]  # later steps train again
    if name == "nan_skip_s0":  # no ZeRO wrapper: Muon itself finds the overflow and counts the skip
        assert result["muon_skipped"] == 1
    else:  # the ZeRO wrapper found the overflow, counted it and never called Muon (no second check)
        assert (result["skipped"], result["muon_skipped"]) == (1, 0)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_frozen_matrix_never_changes(runs: dict, stage: int) -> None:
    result = runs[2]["frozen"][stage]
    assert result["frozen_same"] and result["others_moved"]


@pytest.mark.parametrize("name", ["resume_s1_fp32", "resume_s2_bf16"])
def test_resume_equals_uninterrupted(runs: dict, name: str) -> None:
    result = runs[2][name]
    for key, value in result["continued"].items():
        assert torch.equal(value, result["resumed"][key]), key


def test_loading_at_another_world_size_is_a_clear_error(runs: dict) -> None:
    message = runs[3]["elsewhere_s1_fp32"]["error"]
    assert "world size of 2" in message and "current world size is 3" in message


def test_use_muon_tags_are_honoured(runs: dict) -> None:
    tagged = reference_weights(adamw=TAGGED_ADAMW)
    assert update_error(runs[2]["tagged_s2"], tagged, initial_weights()) < FLOAT32_ROUNDING
    assert update_error(runs[2]["tagged_s2"], reference_weights(), initial_weights()) > 1e-2


@pytest.mark.parametrize("name", ["moe_s1", "moe_s2", "moe_ep2_s1", "moe_ep2_s2"])
def test_moe_experts_are_separate_matrices_and_dp_invariant(runs: dict, name: str) -> None:
    """ep_size=2 at W=2 puts experts 0-1 on rank 0 and 2-3 on rank 1: the same weights as one process."""
    single, result = runs[1]["moe_s0"], runs[2][name]
    assert result["start"].keys() == single["start"].keys()
    assert all(torch.equal(result["start"][k], v) for k, v in single["start"].items())
    assert len(single["expert_matrices"]) == 8  # 4 experts x 2 linear layers, each its own matrix
    assert single["counts"] == (8, 11)  # the router (gate.wg), embedding, head and biases go to AdamW
    assert update_error(result["weights"], single["weights"], single["start"]) < FLOAT32_ROUNDING


def test_engine_logs_which_muon_it_built(runs: dict) -> None:
    import muon_ds

    line = f"muon_ds {muon_ds.__version__}: Moonlight Muon (scale=moonlight, ns_dtype=float32, ns_steps=5) " \
           "under ZeRO stage 1 [DeepSpeedZeroOptimizer]: 3 matrices -> Muon, 6 tensors -> AdamW"
    assert line in runs[2]["log"]


@pytest.mark.parametrize("case,expected", [
    ("offload", "offload_optimizer"),
    ("elastic", "elastic_checkpoint"),
    ("unknown_key", "unknown key(s) ['momentumm']; valid keys are"),
    ("bad_value", "momentum: Input should be less than 1"),
    ("ns_compile_not_boolean", "Muon optimizer params: ns_compile: Input should be a valid boolean"),
    ("vector_tagged", "parameter 'up.bias' of shape (40,) is tagged use_muon=True but is not a matrix"),
    ("old_deepspeed", "tested with deepspeed >=0.19.0,<0.20.0; found deepspeed 0.16.4"),
])
def test_unsupported_settings_are_clear_errors(runs: dict, case: str, expected: str) -> None:
    assert expected in runs[1]["errors"][case]
