"""Test support: run a module on W local CPU ranks (gloo), as torchrun would, and collect its files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(world_size: int, module: str, *args: str, port: int,
                env: Optional[dict[str, str]] = None) -> list[subprocess.Popen]:
    """Start ``python -m module args`` on each rank (``env`` overriding this process's environment), output
    piped (stderr into stdout)."""
    base = dict(os.environ, **(env or {}))
    procs = []
    for rank in range(world_size):
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=rank_env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>
    behind when a rank does not exit cleanly: remove those of this launch."""
    for path in SHM.glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def run_ranks(world_size: int, module: str, *args: str, timeout: float = 900,
              env: Optional[dict[str, str]] = None) -> list[str]:
    """Start ``python -m module args`` on each rank; returns each rank's output, raises if any failed."""
    port = free_port()
    procs = start_ranks(world_size, module, *args, port=port, env=env)
    outputs = []
    try:
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise
            outputs.append(out)
    finally:
        remove_shm_buffers(port)
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"ranks {failed} of {module} failed:\n" + outputs[failed[0]][-6000:])
    return outputs
