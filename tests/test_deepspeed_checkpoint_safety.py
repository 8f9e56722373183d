"""examples/deepspeed/train.py under faults: a rank dying mid-save, a re-save of a saved step, a stalled rank."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed import free_port, remove_shm_buffers, start_ranks
from tests.train_with_faults import DIED

TINY = ["--deepspeed-config", "configs/deepspeed/zero1_fp32.json", "--width", "32", "--layers", "1", "--heads", "2",
        "--seq-len", "16", "--log-interval", "1"]
STALL_TIMEOUT_S = 5


def launch(fault: str, *train_args: str, env: dict[str, str] | None = None, timeout: float = 300
           ) -> list[tuple[int, str]]:
    """train.py on 2 ranks with ``fault`` on rank 1; each rank's (exit status, output)."""
    port = free_port()
    procs = start_ranks(2, "tests.train_with_faults", fault, *TINY, *train_args, port=port, env=env)
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
        return [(proc.returncode, out) for proc, out in zip(procs, outputs)]
    finally:
        for proc in procs:
            proc.kill()
        remove_shm_buffers(port)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("safety")


def test_the_final_save_of_a_saved_step_does_not_rewrite_it(checkpoints: Path) -> None:
    # --steps 4 --save-interval 2: step4 is saved at the interval and again as the final save;
    # rank 1 dies if it rewrites a shard, which would destroy the newest good checkpoint.
    ranks = launch("die_rewriting", "--steps", "4", "--save-interval", "2", "--checkpoint-dir", str(checkpoints))
    assert [rc for rc, _ in ranks] == [0, 0], ranks[1][1][-3000:]
    assert (checkpoints / "latest").read_text() == "step4"


def test_rank_dying_mid_save_leaves_latest_naming_a_complete_checkpoint(checkpoints: Path) -> None:
    ranks = launch("die_writing=step6", "--steps", "6", "--save-interval", "2", "--checkpoint-dir",
                   str(checkpoints))
    assert ranks[1][0] == DIED and ranks[0][0] != 0
    assert (checkpoints / "latest").read_text() == "step4"  # not the half-written step6
    ranks = launch("none", "--steps", "6", "--save-interval", "2", "--checkpoint-dir", str(checkpoints))
    assert [rc for rc, _ in ranks] == [0, 0], ranks[0][1][-3000:]
    assert f"resumed from {checkpoints} at step 4" in ranks[0][1]
    assert (checkpoints / "latest").read_text() == "step6"


def test_stalled_rank_fails_the_job_in_bounded_time_with_a_message(tmp_path: Path) -> None:
    port = free_port()
    procs = start_ranks(2, "tests.train_with_faults", "stall_at=3", *TINY, "--steps", "50", port=port,
                        env={"MUON_DS_COLLECTIVE_TIMEOUT": str(STALL_TIMEOUT_S)})
    try:
        while "rank 1 stalls" not in (line := procs[1].stdout.readline()):
            assert line, "rank 1 ended before stalling"
        stalled = time.monotonic()
        try:
            out, _ = procs[0].communicate(timeout=STALL_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waits {STALL_TIMEOUT_S + 60} s after rank 1 stalled")
        waited = time.monotonic() - stalled
    finally:
        for proc in procs:
            proc.kill()
        remove_shm_buffers(port)
    assert procs[0].returncode == 1
    assert "rank 0: a collective failed (timeout 5 s, $MUON_DS_COLLECTIVE_TIMEOUT): another rank stalled" in out
    assert waited >= STALL_TIMEOUT_S * 0.9


def test_a_directory_without_complete_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    from muon_ds.deepspeed.checkpoint import resume

    (tmp_path / "step2").mkdir()  # written by engine.save_checkpoint: no completion record
    (tmp_path / "latest").write_text("step2")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint .* its 'latest' was not written by muon_ds"):
        resume(None, tmp_path)  # type: ignore[arg-type]  (refused before the engine is used)
    (tmp_path / "latest").unlink()
    assert resume(None, tmp_path) is None  # type: ignore[arg-type]  (nothing to resume: start afresh)
