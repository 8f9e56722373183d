"""Test support: examples/deepspeed/train.py with a fault injected on rank 1.

``python -m tests.train_with_faults FAULT TRAIN_ARGS...``, FAULT one of
  none              no fault;
  die_writing=TAG   rank 1 dies half-way through writing its optimizer shard of checkpoint TAG;
  die_rewriting     rank 1 dies half-way through writing a shard file it already wrote once;
  stall_at=N        rank 1 stops itself (SIGSTOP) at the start of its optimizer step N.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from typing import Any

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.engine import DeepSpeedEngine

from tests.distributed import REPO

DIED = 17  # the exit status of the rank that dies


def _dying_save(fault: str) -> None:
    real = TorchCheckpointEngine.save
    written: set[str] = set()

    def save(self: TorchCheckpointEngine, state_dict: Any, path: str) -> None:
        shard = "optim_states" in path
        dies = shard and (path in written if fault == "die_rewriting" else f"/{fault.split('=')[1]}/" in path)
        written.add(path)
        if dies:
            with open(path, "wb") as file:
                file.write(b"PK\x03\x04 a torch.save cut short")
            os._exit(DIED)
        real(self, state_dict, path)

    TorchCheckpointEngine.save = save


def _stall(step: int) -> None:
    real = DeepSpeedEngine.step
    count = [0]

    def stalling_step(self: DeepSpeedEngine, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == step:
            print(f"rank 1 stalls at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(self, *args, **kwargs)

    DeepSpeedEngine.step = stalling_step


def main() -> None:
    fault, train_args = sys.argv[1], sys.argv[2:]
    if os.environ["RANK"] == "1" and fault != "none":
        if fault.startswith("stall_at="):
            _stall(int(fault.split("=")[1]))
        else:
            _dying_save(fault)
    sys.argv = [str(REPO / "examples/deepspeed/train.py"), *train_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
