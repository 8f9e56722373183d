"""TEST SUPPORT ONLY: make megatron-core 0.16.1 run on CPU with the gloo backend.

megatron-core assumes CUDA in many places: ``torch.cuda.current_device()`` as a device, CUDA streams in
the MoE all-to-all dispatcher, the CUDA RNG tracker (``reinit_parallel`` seeds it in its CPU mode),
mock TransformerEngine classes taken for real ones, uneven all_gather / list reduce_scatter (gloo has
neither) in the MoE dispatcher under TP x EP, ``device='cuda'`` and ``'torch.cuda.FloatTensor'``
checks in the optimizers, gradient clipping and grad buffers. ``apply()`` patches those, idempotently,
in the current process, ``restore()`` undoes them; the product never imports this module and runs
unchanged on GPUs. Checked here: forward/backward at TP=2+SP, EP=2, TP=2xEP=2, PP=2 stage building,
Megatron DDP + finalize_model_grads, and a distributed-optimizer Adam step at DP=2. ``init_process(...)`` patches, starts
gloo and Megatron's parallel state for one rank, ``reinit_parallel(...)`` switches TP/EP/PP within the
same world, ``shutdown()`` tears both down. (gloo in torch 2.13 has all_gather_into_tensor,
reduce_scatter_tensor and all_to_all_single, so no collective needs replacing.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import types
from typing import Any

import torch
import torch.distributed as dist

_MISSING = object()
_ORIGINALS: list[tuple[Any, str, Any]] = []


class _NoStream:
    """Stands in for torch.cuda.Stream (a class, so annotations like ``Stream | None`` still work)."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def wait_stream(self, _other: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self) -> "_NoStream":
        return self


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by megatron modules that hard-code ``device='cuda'``: factories make CPU tensors."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full")

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name not in self._FACTORIES:
            return value

        def on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return value(*args, **kwargs)

        return on_cpu


def _type_as_on_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``tensor.type()`` names CPU tensors as CUDA ones: megatron's optimizers accept only those names."""
    name = _ORIGINAL_TYPE(self, *args, **kwargs)
    if not args and not kwargs and isinstance(name, str) and name.startswith("torch.") and not self.is_cuda:
        return "torch.cuda." + name[len("torch."):]
    return name


_ORIGINAL_TYPE = torch.Tensor.type
_ORIGINAL_ALL_GATHER = dist.all_gather


def _all_gather_uneven(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None,
                       async_op: bool = False) -> Any:
    """gloo's all_gather needs equal sizes; the MoE dispatcher gathers uneven token counts under TP x EP."""
    if all(t.shape == tensor.shape for t in tensor_list):
        return _ORIGINAL_ALL_GATHER(tensor_list, tensor, group=group, async_op=async_op)
    rows = max(t.shape[0] for t in tensor_list)
    padded = tensor.new_zeros((rows, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in tensor_list]
    _ORIGINAL_ALL_GATHER(gathered, padded, group=group)
    for out, full in zip(tensor_list, gathered):
        out.copy_(full[: out.shape[0]])
    return None


def _reduce_scatter_list(output: torch.Tensor, input_list: list[torch.Tensor], op: Any = dist.ReduceOp.SUM,
                         group: Any = None, async_op: bool = False) -> Any:
    """gloo has no list reduce_scatter (used with uneven splits): all-reduce everything, keep this rank's part."""
    full = torch.cat([t.reshape(t.shape[0], -1) for t in input_list])
    dist.all_reduce(full, op=op, group=group)
    start = sum(t.shape[0] for t in input_list[: dist.get_rank(group)])
    output.copy_(full[start : start + output.shape[0]].reshape(output.shape))
    return None


def _patch(owner: Any, name: str, value: Any) -> None:
    _ORIGINALS.append((owner, name, getattr(owner, name, _MISSING)))
    setattr(owner, name, value)


def apply() -> None:
    """Patch torch.cuda and megatron-core for CPU + gloo in this process (idempotent; see ``restore``)."""
    if _ORIGINALS:
        return
    _patch(torch.cuda, "current_device", lambda: torch.device("cpu"))  # used as a device argument throughout
    _patch(torch.cuda, "Stream", _NoStream)  # the MoE all-to-all dispatcher's side stream
    _patch(torch.cuda, "current_stream", lambda *_a, **_k: _NoStream())
    _patch(torch.cuda, "stream", lambda *_a, **_k: contextlib.nullcontext())
    _patch(torch.cuda, "synchronize", lambda *_a, **_k: None)
    _patch(torch.Tensor, "record_stream", lambda self, *_a: None)
    _patch(dist, "all_gather", _all_gather_uneven)
    _patch(dist, "reduce_scatter", _reduce_scatter_list)

    # Without TransformerEngine, megatron.core.extensions still defines mock TE classes, so
    # multi_latent_attention.py believes TE is present and isinstance() checks against mocks fail.
    import megatron.core.transformer.multi_latent_attention as mla

    _patch(mla, "HAVE_TE", False)
    for name in ("TELinear", "TEColumnParallelLinear", "Linear"):
        _patch(mla, name, None)

    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    _patch(moe_utils, "te_general_gemm", None)  # left undefined when TE is absent; the router checks it
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def _move(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        """On CPU megatron leaves the all-to-all split sizes as tensors where it wants numpy arrays."""
        out = original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)
        return out.numpy() if as_numpy and torch.is_tensor(out) else out

    _patch(moe_utils, "maybe_move_tensor_to_cpu", _move)
    _patch(token_dispatcher, "maybe_move_tensor_to_cpu", _move)

    # Optimizers, gradient clipping and the grad buffers create tensors with device='cuda'.
    import megatron.core.distributed.param_and_grad_buffer as param_and_grad_buffer
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.grad_scaler as grad_scaler
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as core_utils

    cpu_torch = _CpuTorch("torch")
    for module in (optimizer, clip_grads, distrib_optimizer, grad_scaler, param_and_grad_buffer, core_utils):
        _patch(module, "torch", cpu_torch)
    _patch(torch.Tensor, "type", _type_as_on_cuda)


def restore() -> None:
    """Undo ``apply`` (for tests that share a process with others)."""
    while _ORIGINALS:
        owner, name, value = _ORIGINALS.pop()
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)


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
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    reinit_parallel(tp=tp, ep=ep, pp=pp)


def shutdown() -> None:
    """Tear down parallel state and the process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["apply", "restore", "free_port", "init_process", "reinit_parallel", "shutdown"]
