"""TEST SUPPORT ONLY: one rank of Megatron-LM's own ``pretrain_gpt.py`` on CPU (gloo), unmodified but for hardware.

``python -m tests.pretrain_gpt_worker ROUTE TREE ARGS...`` (under tests.distributed.run_ranks; triton on the path,
tests/megatron_lm.py): TREE is an
extracted Megatron-LM training-scripts archive (../shared/megatron-lm/), ROUTE ``launch`` runs its
pretrain_gpt.py through ``muon_ds.megatron.launch`` (no patch), ``patched`` runs it directly (TREE carries
patches/megatron-lm-core_v*-muon_ds.patch). The CPU stand-ins replace only what needs a GPU: the CUDA device,
its architecture and RNG calls (tests/megatron_cpu.py, tests/megatron_cpu_optim.py), the CUDA kernel build and JIT warm-up, and the dataset-helper build (the wheel ships the compiled helpers, but not the Makefile
Megatron-LM's initialisation runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import sys
import types
from pathlib import Path
from typing import Any

import torch

from tests import megatron_cpu_optim


FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "zeros_like",
             "ones_like", "empty_like", "full_like")


def _on_cpu(device: Any) -> Any:
    return "cpu" if device is not None and torch.device(device).type == "cuda" else device


def _cpu_factory(factory: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return factory(*args, **kwargs)

    return make


def _tensor_to(original: Any) -> Any:
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_on_cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        return original(self, *args, **kwargs)

    return to


class _CudaAvailable(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return (lambda: True) if name == "is_available" else getattr(torch.cuda, name)


class _TorchWithCuda(types.ModuleType):
    """``torch`` whose ``cuda.is_available()`` says True, for the one module that refuses to start without it."""

    cuda = _CudaAvailable("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_stand_ins() -> None:
    megatron_cpu_optim.apply()
    for name in FACTORIES:  # the training loop's literal device='cuda' tensors
        setattr(torch, name, _cpu_factory(getattr(torch, name)))
    torch.Tensor.to = _tensor_to(torch.Tensor.to)
    torch.Tensor.cuda = lambda self, *_args, **_kwargs: self
    torch.cuda.set_device = lambda *_args: None
    torch.cuda.get_rng_state = lambda *_args, **_kwargs: torch.get_rng_state()  # the CPU generator is the device's
    torch.cuda.device_count = lambda: 1  # one "device" per rank: Megatron then builds its parallel groups
    import megatron.core.tensor_parallel as tensor_parallel

    seed = tensor_parallel.model_parallel_cuda_manual_seed
    # the CUDA RNG tracker, in megatron-core's own device-free mode (as tests/megatron_cpu.py uses it)
    tensor_parallel.model_parallel_cuda_manual_seed = lambda value, *_args, **_kwargs: seed(
        value, inference_rng_tracker=True, force_reset_rng=True)
    import megatron.core.datasets.utils as dataset_utils
    from megatron.core.datasets import helpers_cpp  # noqa: F401  (fails here if no helpers for this Python)

    dataset_utils.compile_helpers = lambda: None
    if importlib.util.find_spec("megatron.legacy") is not None:  # core_v0.16.1 builds its CUDA kernels
        import megatron.legacy.fused_kernels as fused_kernels

        fused_kernels.load = lambda *_args: None
    import megatron.training.arguments as arguments

    # validate_args asks the GPU's architecture under TP; answer as an H100, launched as its scripts launch it
    arguments.get_device_arch_version = lambda: 9
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import megatron.training.initialize as initialize

    initialize._warmup_jit_function = lambda *_args, **_kwargs: None  # warms the JIT fusions up on a CUDA device
    initialize.torch = _TorchWithCuda("torch")  # initialize_megatron asserts torch.cuda.is_available()


def _tensors(value: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if torch.is_tensor(value):
        out[prefix] = value
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensors(item, f"{prefix}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _tensors(item, f"{prefix}/{index}", out)


def checkpoint_tensors(iteration_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one saved iteration, by file and key path (``torch_dist`` read through torch DCP)."""
    out: dict[str, torch.Tensor] = {}
    if (iteration_dir / ".metadata").exists():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        flat = iteration_dir.parent / f"{iteration_dir.name}.flat.pt"
        dcp_to_torch_save(iteration_dir, flat)
        _tensors(torch.load(flat, weights_only=False), "dist", out)
        flat.unlink()
    for path in sorted(iteration_dir.rglob("*.pt")):
        _tensors(torch.load(path, weights_only=False), str(path.relative_to(iteration_dir)), out)
    return out


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Which tensors of two saved iterations differ (bitwise), and which exist in only one."""
    left, right = checkpoint_tensors(a), checkpoint_tensors(b)
    return {"tensors": len(left), "only_one": sorted(set(left) ^ set(right)),
            "differ": sorted(k for k in set(left) & set(right)
                             if left[k].shape != right[k].shape or not torch.equal(left[k], right[k]))}


def main(argv: list[str]) -> None:
    if argv[0] == "compare":  # python -m tests.pretrain_gpt_worker compare ITER_DIR_A ITER_DIR_B
        print("COMPARE " + json.dumps(compare(Path(argv[1]), Path(argv[2]))), flush=True)
        return
    route, tree, args = argv[0], Path(argv[1]), argv[2:]
    sys.path.insert(0, str(tree))  # as running from TREE: its megatron/training beside the wheel's megatron/core
    _cpu_stand_ins()
    script = str(tree / "pretrain_gpt.py")
    if route == "launch":
        from muon_ds.megatron.launch import main as launch

        launch([script, *args])
    elif route == "patched":
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
    else:
        raise SystemExit(f"route must be 'launch' or 'patched', got {route!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
