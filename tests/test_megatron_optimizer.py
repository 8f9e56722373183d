"""muon_ds's ``get_megatron_optimizer`` on a tiny Moonlight under megatron-core, 1 and 2 CPU ranks (gloo).

Two launches run every scenario (megatron-core's import dominates the time): 2 ranks train with
DP=2 (distributed optimizer, without it, with overlapped grad reduce / param gather and small
buckets, with clipping), TP=2 (+SP), EP=2, PP=2, TP=2 blockwise, bf16, fp16 with an overflow, and
save / resume checkpoints in both of Megatron-LM's formats (torch_dist, torch); then 1 rank trains the
DP=1 run next to muon_ds's single-process Muon and resumes the DP=2 and TP=2 checkpoints (torch_dist,
and torch for DP=2); 4 ranks train TP=2 x EP=2 and TP=2 x DP=2. Weights are compared after 3-4 steps
with NS in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.distributed import run_ranks  # noqa: E402

WORKER = "tests.megatron_worker"
TWO_RANKS = ("dp2:steps=3", "dp2nodist:distopt=0,steps=3", "dp2overlap:overlap=1,steps=3",
             "dp2buckets:bucket=4000,overlap=1,steps=3", "dp2clip:clip=0.05,steps=3",
             "tp2:tp=2,steps=3", "tp2block:tp=2,mode=blockwise,steps=3", "ep2:ep=2,steps=3", "pp2:pp=2,steps=3",
             "gpt_tp2:arch=gpt,tp=2,steps=3", "tp2_megatron_defaults:tp=2,config=megatron,steps=3",
             "bf16:precision=bf16,steps=2", "bf16nd:precision=bf16,distopt=0,steps=2",
             "fp16:precision=fp16,steps=3,poison=1", "ep2bf16:ep=2,precision=bf16,steps=3,poison=1",
             "full:steps=4", "first:steps=2,save=ckpt@2", "resumed:steps=4,load=ckpt",
             "tp2first:tp=2,steps=2,save=ckpt_tp@2,reshardable=1",
             "tp2first_dp:tp=2,steps=2,save=ckpt_tp_dp@2",
             "nd_full:distopt=0,steps=4", "nd_first:distopt=0,steps=2,save=ckpt_nd@2",
             "nd_resumed:distopt=0,steps=4,load=ckpt_nd",
             "t_first:steps=2,save=ckpt_torch@2,format=torch", "t_resumed:steps=4,load=ckpt_torch,format=torch",
             "ep2_full:ep=2,steps=4", "ep2_t_first:ep=2,steps=2,save=ckpt_torch_ep@2,format=torch",
             "ep2_t_resumed:ep=2,steps=4,load=ckpt_torch_ep,format=torch",
             "bf16_full:precision=bf16,steps=4",
             "bf16_t_first:precision=bf16,steps=2,save=ckpt_torch_bf16@2,format=torch",
             "bf16_t_resumed:precision=bf16,steps=4,load=ckpt_torch_bf16,format=torch",
             "tp2_full:tp=2,steps=4", "tp2_t_first:tp=2,steps=2,save=ckpt_torch_tp@2,format=torch",
             "tp2_t_resumed:tp=2,steps=4,load=ckpt_torch_tp,format=torch",
             "pp2_full:pp=2,steps=4", "pp2_t_first:pp=2,steps=2,save=ckpt_torch_pp@2,format=torch",
             "pp2_t_resumed:pp=2,steps=4,load=ckpt_torch_pp,format=torch")
ONE_RANK = ("ref:reference=1,steps=3", "gpt_ref:arch=gpt,reference=1,steps=3", "fused:reference=2,steps=3",
            "dp1clip:clip=0.05,steps=3", "resumed_dp1:steps=4,load=ckpt",
            "resumed_tp1:steps=4,load=ckpt_tp,reshardable=1", "resumed_tp1_dp:steps=4,load=ckpt_tp_dp",
            "t_resumed_dp1:steps=4,load=ckpt_torch,format=torch")
FOUR_RANKS = ("tp2ep2:tp=2,ep=2,steps=3", "tp2dp2:tp=2,steps=3")
ADAMW = ("embedding", "output_layer", "router", "layernorm", "norm.weight")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("megatron_muon")
    run_ranks(2, WORKER, str(out), *TWO_RANKS)
    run_ranks(1, WORKER, str(out), *ONE_RANK)
    run_ranks(4, WORKER, str(out), *FOUR_RANKS)
    return out


def _load(out: Path, name: str) -> dict:
    """Every rank's result; weights merged (ranks holding the same tensor must agree exactly)."""
    files = sorted(out.glob(f"{name}.rank*.pt"))
    assert files, f"no output for scenario {name}"
    results = [torch.load(f) for f in files]
    merged: dict[str, torch.Tensor] = {}
    for result in results:
        for key, value in result["weights"].items():
            if key in merged:
                assert torch.equal(merged[key], value), f"{name}: ranks disagree on {key}"
            merged[key] = value
    return {"weights": merged, "initial": results[0]["initial"], "results": results}


def _errors(a: dict, b: dict) -> dict[str, float]:
    """Per tensor: max |a - b| relative to the largest change training made to it."""
    return {k: ((a["weights"][k] - b["weights"][k]).abs().max()
                / (b["weights"][k] - b["initial"][k]).abs().max().clamp_min(1e-12)).item() for k in b["weights"]}


def _assert_same_training(out: Path, name: str, reference: str = "ref", muon_tolerance: float = 1e-4) -> None:
    run, ref = _load(out, name), _load(out, reference)
    assert set(run["weights"]) == set(ref["weights"])
    errors = _errors(run, ref)
    muon = {k: e for k, e in errors.items() if not any(tag in k for tag in ADAMW)}
    assert len(muon) >= 8  # the GPT has 8 hidden matrices, the Moonlight 30
    # Muon's matrices: float32 rounding. AdamW's first steps divide by |g|, which amplifies rounding
    # differences of tiny gradient entries (the same happens with Megatron's Adam).
    assert max(muon.values()) < muon_tolerance, sorted(muon.items(), key=lambda kv: -kv[1])[:3]
    assert max(errors.values()) < 2e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def test_dp1_megatron_path_is_muon_ds_single_process_muon(runs: Path) -> None:
    """DP=1: Megatron's wrappers + distributed optimizer around our Muon == muon_ds's Muon with gate/up split."""
    errors = _load(runs, "ref")["results"][0]["reference_errors"]
    assert len(errors) == 3 and max(errors) < 1e-5, errors


def test_gpt_qkv_split_per_query_group_is_muon_ds_muon(runs: Path) -> None:
    """A plain GPT (grouped-query attention): q, k, v orthogonalized separately (--muon-no-split-qkv unset),
    as the reference holding them as three stacked matrices does."""
    errors = _load(runs, "gpt_ref")["results"][0]["reference_errors"]
    assert len(errors) == 3 and max(errors) < 1e-5, errors


def test_gpt_tp2_with_split_qkv_equals_tp1(runs: Path) -> None:
    _assert_same_training(runs, "gpt_tp2", reference="gpt_ref")


def test_fused_gate_up_reference_is_detected(runs: Path) -> None:
    """Positive control: a reference orthogonalizing fc1 as one fused matrix differs."""
    errors = _load(runs, "fused")["results"][0]["reference_errors"]
    assert min(errors) > 1e-3, errors


def test_dp2_distributed_optimizer_equals_dp1(runs: Path) -> None:
    _assert_same_training(runs, "dp2")
    results = _load(runs, "dp2")["results"]
    assert results[0]["gathers"] > 0, "no matrix was cut by the distributed optimizer's shard boundary"
    assert all(flops > 0 for flops in results[0]["ns_flops"]), "Newton-Schulz work is not spread over DP"


def test_dp2_without_distributed_optimizer_equals_dp1(runs: Path) -> None:
    _assert_same_training(runs, "dp2nodist")


def test_tp2_full_matrix_equals_tp1(runs: Path) -> None:
    _assert_same_training(runs, "tp2")
    assert all(flops > 0 for flops in _load(runs, "tp2")["results"][0]["ns_flops"])


def test_ep2_equals_ep1(runs: Path) -> None:
    _assert_same_training(runs, "ep2")


def test_pp2_equals_pp1(runs: Path) -> None:
    """Two pipeline stages (1F1B schedule; the dense layer on one, the MoE layers on the other)."""
    _assert_same_training(runs, "pp2")


@pytest.mark.parametrize("name", ["tp2ep2", "tp2dp2"])
def test_four_ranks_equal_one(runs: Path, name: str) -> None:
    """TP=2 x EP=2 and TP=2 x DP=2 (distributed optimizer) on 4 ranks: NS spread over all four."""
    _assert_same_training(runs, name)
    assert all(flops > 0 for flops in _load(runs, name)["results"][0]["ns_flops"])


def test_blockwise_differs_from_full(runs: Path) -> None:
    """--muon-tp-mode blockwise orthogonalizes each TP shard: the same check must see it differ."""
    errors = _errors(_load(runs, "tp2block"), _load(runs, "ref"))
    assert max(errors.values()) > 0.05


def test_megatron_core_defaults_from_python_are_warned_about(runs: Path) -> None:
    """OptimizerConfig(optimizer="muon") from Python gets megatron-core's dataclass defaults (blockwise TP NS,
    5x Moonlight's scale): training is off Moonlight, and the start-up log says so; moonlight_optimizer_config
    (every other scenario) warns about nothing."""
    warned = _load(runs, "tp2_megatron_defaults")["results"][0]["warnings"]
    assert any("blockwise" in w for w in warned) and any("spectral x 1" in w for w in warned), warned
    assert _load(runs, "tp2")["results"][0]["warnings"] == []
    assert max(_errors(_load(runs, "tp2_megatron_defaults"), _load(runs, "ref")).values()) > 0.5


def test_resume_from_dist_checkpoint_is_exact(runs: Path) -> None:
    errors = _errors(_load(runs, "resumed"), _load(runs, "full"))
    assert max(errors.values()) == 0.0, max(errors.items(), key=lambda kv: kv[1])


def test_resume_without_distributed_optimizer_is_exact(runs: Path) -> None:
    """Megatron's FP32Optimizer wrapper (no distributed optimizer): its own sharded state dict format."""
    errors = _errors(_load(runs, "nd_resumed"), _load(runs, "nd_full"))
    assert max(errors.values()) == 0.0, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("resumed, full", [("t_resumed", "full"), ("ep2_t_resumed", "ep2_full"),
                                           ("bf16_t_resumed", "bf16_full"), ("tp2_t_resumed", "tp2_full"),
                                           ("pp2_t_resumed", "pp2_full")])
def test_resume_from_torch_format_with_distributed_optimizer_is_exact(runs: Path, resumed: str, full: str) -> None:
    """--ckpt-format torch with --use-distributed-optimizer (configs/megatron/*.args.sh): the model file,
    the optimizer's state_dict and distrib_optim.pt (dense and expert members; fp32 and bf16 params; DP=2,
    EP=2, TP=2 and PP=2: one distrib_optim.pt per model-parallel rank)."""
    run, reference = _load(runs, resumed)["weights"], _load(runs, full)["weights"]
    assert set(run) == set(reference)
    differ = [k for k in reference if not torch.equal(run[k], reference[k])]
    assert not differ, differ[:3]


def test_torch_format_resumes_at_another_dp_size(runs: Path) -> None:
    """distrib_optim.pt is in buffer space without padding: saved at DP=2, resumed at DP=1."""
    _assert_same_training(runs, "t_resumed_dp1", reference="full")


def test_resume_at_another_dp_size(runs: Path) -> None:
    """Saved at DP=2, resumed at DP=1 (model-space optimizer state): float32 rounding only."""
    _assert_same_training(runs, "resumed_dp1", reference="full")


@pytest.mark.parametrize("resumed", ["resumed_tp1", "resumed_tp1_dp"])
def test_resume_at_another_tp_size(runs: Path, resumed: str) -> None:
    """Saved at TP=2 (gate/up interleaved shards), resumed at TP=1; compared with an uninterrupted DP run.
    The model-space state reshards whatever the metadata says: with Megatron-LM's
    --dist-ckpt-optim-fully-reshardable ("fully_reshardable") and without it ("dp_reshardable")."""
    _assert_same_training(runs, resumed, reference="full", muon_tolerance=1e-3)


def test_dp2_with_many_buckets_equals_dp1(runs: Path) -> None:
    """Small DDP buckets (with overlapped reduce, else Megatron uses one): each bucket is split over the DP
    ranks, so many matrices are cut."""
    _assert_same_training(runs, "dp2buckets")
    assert _load(runs, "dp2buckets")["results"][0]["gathers"] > _load(runs, "dp2")["results"][0]["gathers"]


def test_overlapped_grad_reduce_and_param_gather(runs: Path) -> None:
    _assert_same_training(runs, "dp2overlap")


def test_grad_clipping_dp2_equals_dp1(runs: Path) -> None:
    """Megatron's global-norm clipping (0.05, active here) before Muon, at DP=2 and DP=1."""
    _assert_same_training(runs, "dp2clip", reference="dp1clip")
    assert max(_errors(_load(runs, "dp1clip"), _load(runs, "ref")).values()) > 1e-2  # clipping changed the run


def test_fp16_overflow_skips_the_step_with_state_intact(runs: Path) -> None:
    """An inf gradient on one rank: every rank skips, main params, momentum and Adam moments unchanged.
    Megatron's loss scaler checks the gradients and agrees on it: Muon does not repeat the agreement."""
    for result in _load(runs, "fp16")["results"]:
        assert result["skipped_intact"] is True
        assert result["agreements"] == 0


def test_bf16_moe_skips_a_non_finite_step_with_one_agreement_per_step(runs: Path) -> None:
    """bf16 has no loss scaler, so Muon checks: an inf gradient on one rank skips the step on every rank
    with every state intact, and the dense and expert optimizers share one agreement per step (3 steps)."""
    for result in _load(runs, "ep2bf16")["results"]:
        assert result["members"] == 2
        assert result["skipped_intact"] is True
        assert result["agreements"] == 3


@pytest.mark.parametrize("name", ["bf16", "bf16nd"])
def test_bf16_trains(runs: Path, name: str) -> None:
    """bf16 params with fp32 main params, with the distributed optimizer and with Float16OptimizerWithFloat16Params."""
    run = _load(runs, name)
    changed = [(run["weights"][k] - run["initial"][k]).abs().max().item() for k in run["weights"]]
    assert all(torch.isfinite(w).all() for w in run["weights"].values()) and min(changed) > 0
