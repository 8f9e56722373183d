"""The Slurm examples on a real one-node Slurm (Debian's slurm-wlm + munge on localhost).

Off by default: ``MUON_DS_SLURM_TEST=1`` enables it (root needed; tests/slurm/setup_slurm.sh
installs and starts Slurm). ``bash tests/slurm/run_slurm_test.sh`` does both.
The bad-input check of the sbatch script runs everywhere.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from tests.distributed import REPO

SBATCH = REPO / "examples" / "slurm" / "deepspeed.sbatch"
STEPS = 40
ENABLED = os.environ.get("MUON_DS_SLURM_TEST") == "1"
needs_slurm = pytest.mark.skipif(not ENABLED, reason="set MUON_DS_SLURM_TEST=1 (root) to run the Slurm tests")


def run(*cmd: str, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def slurm() -> Iterator[list[str]]:
    """Slurm up; yields a list the tests add their job ids to, cancelled at the end if still there."""
    run("bash", str(REPO / "tests" / "slurm" / "setup_slurm.sh"), timeout=600)
    jobs: list[str] = []
    yield jobs
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)


def job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, Reason, ExitCode, ...)."""
    text = run("scontrol", "show", "job", "-o", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", text))


def submit(jobs: list[str], tmp: Path, name: str, checkpoints: Path, launcher: str = "srun") -> tuple[str, Path]:
    """The example sbatch script at CPU scale, GPU directives overridden, fp32 ZeRO-1 on 2 ranks: 2 srun
    tasks, or 1 task running torchrun with 2 workers."""
    train_args = f"--steps {STEPS} --save-interval 10 --log-interval 5 --width 64"
    export = ",".join(["ALL", f"PYTHONPATH={REPO}", f"REPO={REPO}", "DS_CONFIG=configs/deepspeed/zero1_fp32.json",
                       f"CHECKPOINT_DIR={checkpoints}", f"TRAIN_ARGS={train_args}", f"LAUNCHER={launcher}",
                       "GPUS_PER_NODE=2"])
    tasks, cpus = (2, 1) if launcher == "srun" else (1, 2)
    job_id = run("sbatch", "--parsable", f"--job-name={name}", "--gpus-per-node=0", "--nodes=1",
                 f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus}", "--time=30:00", f"--output={tmp}/%x-%j.out",
                 f"--export={export}", str(SBATCH)).strip().split(";")[0]
    jobs.append(job_id)
    return job_id, tmp / f"{name}-{job_id}.out"


def wait(job_id: str, done: Callable[[dict[str, str]], bool], timeout: float = 600) -> dict[str, str]:
    """Poll scontrol (sbatch --wait polls too slowly) until ``done(state)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job(job_id)
        if done(state):
            return state
        if state["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            raise AssertionError(f"job {job_id} ended {state['JobState']} ({state.get('Reason')})")
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job(job_id)['JobState']} after {timeout} s")


def finished(state: dict[str, str]) -> bool:
    return state["JobState"] == "COMPLETED"


def losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss (\S+)", log, re.M)]


def weights(checkpoints: Path) -> dict[str, torch.Tensor]:
    tag = (checkpoints / "latest").read_text().strip()
    assert tag == f"step{STEPS}", tag
    return torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.fixture(scope="module")
def uninterrupted(slurm: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("slurm")
    job_id, log = submit(slurm, tmp, "straight", tmp / "ckpt")
    state = wait(job_id, finished)
    assert state["ExitCode"] == "0:0", log.read_text()[-3000:]
    return tmp


@needs_slurm
def test_job_trains_and_checkpoints(uninterrupted: Path) -> None:
    log = next(uninterrupted.glob("straight-*.out")).read_text()
    assert "matrices -> Muon" in log and "rendezvous: localhost:" in log, log[-3000:]
    values = losses(log)
    assert len(values) >= 5 and values[-1] < values[0] - 0.5, values
    assert (uninterrupted / "ckpt" / "latest").is_file()


@needs_slurm
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_requeued_job_resumes_to_the_same_weights(slurm: list[str], uninterrupted: Path, tmp_path: Path,
                                                  launcher: str) -> None:
    job_id, log = submit(slurm, tmp_path, "requeued", tmp_path / "ckpt", launcher)
    deadline = time.monotonic() + 300
    while not (log.is_file() and re.search(r"^step 15 ", log.read_text(), re.M)):
        assert time.monotonic() < deadline and job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.is_file() else job(job_id)
        time.sleep(0.5)
    # What Slurm sends 2 minutes before the time limit (--signal=B:USR1@120), sent now.
    run("scancel", "--batch", "--signal=USR1", job_id)
    state = wait(job_id, finished)
    text = log.read_text()
    assert state["Restarts"] == "1" and state["ExitCode"] == "0:0", text[-3000:]
    assert "USR1: saving a checkpoint, then requeueing" in text, text[-3000:]
    saved = re.search(r"saved step (\d+) for requeue", text)
    resumed = re.search(r"resumed from \S+ at step (\d+)", text)
    assert saved and resumed and saved.group(1) == resumed.group(1), text[-3000:]  # the signal's checkpoint
    straight, requeued = weights(uninterrupted / "ckpt"), weights(tmp_path / "ckpt")
    assert straight.keys() == requeued.keys()
    for name in straight:
        assert torch.equal(straight[name], requeued[name]), name


def test_sbatch_script_outside_slurm_says_how_to_submit() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Slurm not found" in proc.stderr or "not inside a Slurm job" in proc.stderr, proc.stderr
