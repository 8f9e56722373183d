"""One collective timeout for every process group, so a stalled rank fails the job instead of hanging it.

torch applies ``init_process_group``'s timeout to the world group only: groups made later with
``new_group`` (DeepSpeed's data-parallel and expert groups, where ZeRO's collectives run) get the
backend's default, 30 minutes for gloo. A rank stopped by SIGSTOP (or a hung GPU) then leaves the
others waiting with no message. :func:`init_distributed` sets the timeout for all of them.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import deepspeed
import torch.distributed as dist
from torch.distributed import distributed_c10d

TIMEOUT_ENV = "MUON_DS_COLLECTIVE_TIMEOUT"  # seconds
DEFAULT_TIMEOUT_S = 600.0


def collective_timeout() -> timedelta:
    """``$MUON_DS_COLLECTIVE_TIMEOUT`` seconds, else 10 minutes."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout as a positive number of seconds")
    return timedelta(seconds=seconds)


def set_default_timeout(timeout: timedelta) -> None:
    """Make ``timeout`` the default of process groups created from now on (torch reads it at creation)."""
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def init_distributed(backend: str, timeout: Optional[timedelta] = None) -> timedelta:
    """``deepspeed.init_distributed`` with ``timeout`` (default :func:`collective_timeout`) on every group."""
    timeout = collective_timeout() if timeout is None else timeout
    set_default_timeout(timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return timeout


PEER_FAILURES = ("Timed out", "Connection closed by peer", "Connection reset by peer")  # gloo's words


def is_peer_failure(error: BaseException) -> bool:
    """A collective that failed because another rank stalled or died (not a bug of this rank)."""
    return isinstance(error, dist.DistBackendError) or any(words in str(error) for words in PEER_FAILURES)
