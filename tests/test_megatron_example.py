"""examples/megatron/train_tiny_cpu.py, launched with torchrun on 2 CPU ranks as its docstring says: the tiny
Moonlight trains with megatron-core and muon_ds's Muon (distributed optimizer) and its loss goes down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "megatron" / "train_tiny_cpu.py"


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SCRIPT), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("parallel", [[], ["--ep", "2"]], ids=["dp2", "dp2-ep2"])
def test_tiny_moonlight_trains_on_two_cpu_ranks(parallel: list[str]) -> None:
    run = _torchrun("--steps", "30", *parallel)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:])
    losses = result["train_losses"]
    assert len(losses) == 30 and all(loss == loss for loss in losses)  # no NaN
    # from ln(256) = 5.55 for uniform bytes to well below it: a byte model learning Python source
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert result["held_out_after"] < result["held_out_before"] - 1.5
    assert "held-out loss after 30 steps" in run.stdout


def test_refuses_parallel_sizes_the_world_size_does_not_divide() -> None:
    run = _torchrun("--tp", "3")
    assert run.returncode != 0 and "world size 2 is not divisible by --tp 3 x --ep 1" in run.stderr


LAUNCH_16B = REPO / "examples" / "megatron" / "pretrain_moonlight_16b.sh"


def dry_run_16b(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    """examples/megatron/pretrain_moonlight_16b.sh with DRY_RUN=1 and a stand-in Megatron-LM and dataset."""
    (tmp_path / "mlm").mkdir(exist_ok=True)
    (tmp_path / "mlm" / "pretrain_gpt.py").touch()
    for suffix in (".bin", ".idx"):
        (tmp_path / f"text_document{suffix}").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_LM_DIR", "DATA_PATH", "TP", "PP", "EP")}
    env.update(MEGATRON_LM_DIR=str(tmp_path / "mlm"), DATA_PATH=str(tmp_path / "text_document"), DRY_RUN="1")
    env.update(settings)
    return subprocess.run(["bash", str(LAUNCH_16B)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_16b_launch_command(tmp_path: Path) -> None:
    run = dry_run_16b(tmp_path, TP="2", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0")
    assert run.returncode == 0, run.stderr
    command = run.stdout.split()
    for expected in ("-m muon_ds.megatron.launch", "--optimizer muon", "--use-distributed-optimizer",
                     "--sequence-parallel", "--tensor-model-parallel-size 2", "--expert-model-parallel-size 8",
                     "--moonlight-spec", "--num-experts 64", "--bf16", "--nnodes 2 --node-rank 1",
                     "--master-addr node0"):
        assert f" {expected} " in f" {' '.join(command)} ", expected


@pytest.mark.parametrize("settings, message", [
    ({"MEGATRON_LM_DIR": ""}, "set MEGATRON_LM_DIR to a Megatron-LM checkout"),
    ({"MEGATRON_LM_DIR": "/no/such/dir"}, "MEGATRON_LM_DIR=/no/such/dir has no pretrain_gpt.py"),
    ({"DATA_PATH": "/no/such/prefix"}, "dataset /no/such/prefix.bin / /no/such/prefix.idx not found"),
    ({"DATA_PATH": ""}, "set DATA_PATH"),
    ({"TP": "3"}, "world size 8 (NNODES x GPUS_PER_NODE) is not divisible by TP x PP = 3"),
    ({"EP": "16"}, "world size 8 is not divisible by ETP x EP x PP = 16"),
    ({"EP": "3", "GPUS_PER_NODE": "3"}, "EP=3 does not divide Moonlight's 64 routed experts"),
    ({"PP": "2", "EP": "4"}, "PP=2 does not divide Moonlight's 27 layers"),
    ({"GLOBAL_BATCH_SIZE": "12"}, "GLOBAL_BATCH_SIZE=12 is not divisible by MICRO_BATCH_SIZE x data-parallel size = 8"),
])
def test_16b_launch_refuses_bad_settings(tmp_path: Path, settings: dict[str, str], message: str) -> None:
    run = dry_run_16b(tmp_path, **settings)
    assert run.returncode == 2 and message in run.stderr, run.stderr
