"""TEST SUPPORT ONLY: the CPU patches megatron-core 0.16.1's optimizer wrappers need, where tests/megatron_cpu.py
does not already apply them.

The wrappers check ``param.type() == 'torch.cuda.FloatTensor'`` and create small tensors with
``device='cuda'`` (optimizer.py, clip_grads.py, utils.py's multi-tensor fallbacks, the pipeline
schedules, the default causal mask), and dist_checkpointing synchronizes the device. ``apply()``
makes CPU tensors report CUDA type names and sends those literal devices to the CPU, in this
process only.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from tests import megatron_cpu

_APPLIED = False


def _cpu_device(kwargs: dict[str, Any]) -> dict[str, Any]:
    device = kwargs.get("device")
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        kwargs = dict(kwargs, device="cpu")
    return kwargs


class _TorchOnCpu(types.ModuleType):
    """``torch`` as the optimizer modules see it: tensor factories given device='cuda' build on the CPU."""

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in ("tensor", "zeros", "ones", "empty", "full"):
            return lambda *args, **kwargs: value(*args, **_cpu_device(kwargs))
        return value


def apply() -> None:
    """Apply tests/megatron_cpu.py's patches, then the optimizer ones (idempotent)."""
    global _APPLIED
    megatron_cpu.apply()
    if _APPLIED:
        return
    _APPLIED = True
    original_type = torch.Tensor.type
    torch.cuda.synchronize = lambda *_args, **_kwargs: None  # dist_checkpointing's save waits on the device

    def cuda_type_names(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(result, str) and result.startswith("torch.") and not self.is_cuda:
            return "torch.cuda." + result[len("torch."):]
        return result

    if not torch.zeros(1).type().startswith("torch.cuda."):  # tests/megatron_cpu.py may already do this
        torch.Tensor.type = cuda_type_names
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.pipeline_parallel.p2p_communication as p2p_communication
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.transformer.utils as transformer_utils
    import megatron.core.utils as core_utils

    proxy = _TorchOnCpu("torch")
    for module in (clip_grads, optimizer, distrib_optimizer, core_utils, schedules, p2p_communication,
                   transformer_utils):
        if module.torch is torch:  # not yet redirected by tests/megatron_cpu.py
            module.torch = proxy
