"""A ZeRO 1, 2 or 3 checkpoint saved at W=2 resumes at W=1 and W=3 and trains on as the uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from muon_ds.cli import main as muon_ds_cli
from muon_ds.deepspeed.universal import to_universal
from tests.distributed import run_ranks
from tests.ds_scenarios import initial_weights, reference_weights, update_error

FLOAT32_ROUNDING = 1e-4  # as in test_deepspeed_zero: DP-invariance holds to float32 rounding
STEPS = 4  # 2 before the checkpoint, 2 after


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume")
    run_ranks(2, "tests.dsckpt_worker", str(out), "save")
    return out


@pytest.fixture(scope="module")
def resumed(saved: Path) -> dict[int, dict]:
    """W=1 also runs the positive control; W=3 converts nothing again (rank 0 converted at W=1)."""
    results = {}
    for world, actions in ((1, ["resume", "control"]), (3, ["resume"])):
        run_ranks(world, "tests.dsckpt_worker", str(saved), *actions)
        results[world] = {a: torch.load(saved / f"{a}_w{world}.pt", weights_only=False) for a in actions}
    return results


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, torch.Tensor]:
    return reference_weights(steps=STEPS)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_at_another_world_size_equals_uninterrupted(resumed: dict, uninterrupted: dict, world: int,
                                                           stage: int) -> None:
    weights = resumed[world]["resume"][stage]
    assert update_error(weights, uninterrupted, initial_weights()) < FLOAT32_ROUNDING


def test_zeroed_momentum_on_resume_is_caught(resumed: dict, uninterrupted: dict) -> None:
    assert update_error(resumed[1]["control"][1], uninterrupted, initial_weights()) > 1e-2


def test_universal_copy_has_muon_and_adamw_state(saved: Path, resumed: dict) -> None:
    zero = saved / "s1" / "universal" / "step2" / "zero"
    assert sorted(p.name for p in (zero / "mix.weight").iterdir()) == ["fp32.pt", "momentum_buffer.pt"]
    assert sorted(p.name for p in (zero / "embed.weight").iterdir()) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt",
                                                                         "step.pt"]
    assert (saved / "s1" / "universal" / "latest_universal").read_text() == "step2"


def test_command_converts(saved: Path, tmp_path: Path) -> None:
    assert muon_ds_cli(["ds-to-universal", "--input", str(saved / "s2" / "step2"), "--output", str(tmp_path)]) == 0
    assert (tmp_path / "step2" / "zero" / "up.weight" / "momentum_buffer.pt").is_file()
    assert muon_ds_cli(["ds-to-universal", "--input", str(saved / "s2" / "step2"), "--output", str(tmp_path)]) == 2


def test_checkpoint_of_another_optimizer_is_a_clear_error(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="param group 0 was not saved by muon_ds's Muon"):
        to_universal(saved / "adamw" / "step2", tmp_path)


def test_checkpoint_without_momentum_is_a_clear_error(saved: Path, tmp_path: Path) -> None:
    broken = tmp_path / "step2"
    shutil.copytree(saved / "s1" / "step2", broken)
    shard_file = broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard = torch.load(shard_file, weights_only=False)
    for state in shard["optimizer_state_dict"]["base_optimizer_state"]["state"].values():
        state.pop("momentum_buffer", None)
    torch.save(shard, shard_file)
    with pytest.raises(ValueError, match=r"zero_pp_rank_1.*\(Muon\) has no \['momentum_buffer'\]"):
        to_universal(broken, tmp_path / "out")
