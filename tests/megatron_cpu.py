"""TEST SUPPORT ONLY: make megatron-core 0.16.1 run on CPU with the gloo backend.

megatron-core assumes CUDA in many places (devices, streams, the RNG tracker) and uses collectives gloo
lacks. ``apply()`` patches those, idempotently, in the current process; the product never imports
this module and runs unchanged on GPUs. ``init_process(...)`` starts gloo and Megatron's parallel
state for one rank of a multi-process test, ``reinit_parallel(...)`` switches TP/EP/PP within it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

_APPLIED = False


class _NoStream:
    """Stands in for torch.cuda.Stream: every operation is synchronous on CPU."""

    def wait_stream(self, _other: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self) -> "_NoStream":
        return self


def _reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, op: Any = dist.ReduceOp.SUM,
                           group: Any = None, async_op: bool = False) -> Any:
    """gloo has no reduce_scatter: all-reduce a copy and keep this rank's chunk."""
    full = input.clone()
    dist.all_reduce(full, op=op, group=group)
    output.copy_(full.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)])
    return _Done() if async_op else None


def _all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: Any = None,
                            async_op: bool = False) -> Any:
    """gloo's all_gather_into_tensor is missing in some builds: gather into a list instead."""
    parts = list(output.chunk(dist.get_world_size(group), dim=0))
    dist.all_gather(parts, input.contiguous(), group=group)
    return _Done() if async_op else None


class _Done:
    def wait(self) -> None:
        return None


def apply() -> None:
    """Patch torch.cuda / torch.distributed / megatron-core for CPU + gloo (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True

    torch.cuda.current_device = lambda: torch.device("cpu")  # used as a device argument throughout
    torch.cuda.Stream = lambda *a, **k: _NoStream()
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *_a, **_k: contextlib.nullcontext()
    torch.Tensor.record_stream = lambda self, *_a: None
    dist.reduce_scatter_tensor = _reduce_scatter_tensor
    dist._reduce_scatter_base = _reduce_scatter_tensor
    dist.all_gather_into_tensor = _all_gather_into_tensor
    dist._all_gather_base = _all_gather_into_tensor

    # Without TransformerEngine, megatron.core.extensions still defines mock TE classes, so
    # multi_latent_attention.py believes TE is present and isinstance() checks against mocks fail.
    import megatron.core.transformer.multi_latent_attention as mla

    mla.HAVE_TE = False
    mla.TELinear = mla.TEColumnParallelLinear = mla.Linear = None

    # On CPU the all-to-all split sizes are left as tensors where a list is expected.
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    moe_utils.te_general_gemm = None  # left undefined when TE is absent; the router's gemm checks it
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def _move(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        out = original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)
        return out.numpy() if as_numpy and torch.is_tensor(out) else out

    moe_utils.maybe_move_tensor_to_cpu = _move
    token_dispatcher.maybe_move_tensor_to_cpu = _move


def free_port() -> int:
    """A free localhost TCP port for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reinit_parallel(tp: int = 1, ep: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """(Re)build Megatron's model-parallel groups inside an initialised gloo world."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


def init_process(rank: int, world_size: int, port: int, tp: int = 1, ep: int = 1, pp: int = 1) -> None:
    """Patch, start gloo for this rank and build the parallel groups."""
    apply()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    reinit_parallel(tp=tp, ep=ep, pp=pp)


def shutdown() -> None:
    """Tear down parallel state and the process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["apply", "free_port", "init_process", "reinit_parallel", "shutdown"]
