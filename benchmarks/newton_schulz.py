"""Newton-Schulz throughput on Moonlight-16B-A3B's matrix shapes: batched by shape vs one at a time.

``python benchmarks/newton_schulz.py [--config CONFIG.json] [--fraction F] [--compile]`` prints TFLOP/s next
to the device's own matmul peak measured in the same run (bf16 on GPUs, float32 on CPUs by default).
It times what the optimizer step runs: :func:`muon_ds.optim.orthogonalize` in place on (N, A, B) batches
already in the NS dtype, through torch.compile with ``--compile`` (the ``ns_compile`` option), with the
standard quintic FLOP count (:func:`muon_ds.newton_schulz.ns_flops`). ``--fraction`` orthogonalizes that
share of each shape's matrices, at least one (the CPU default: one; GPUs: all 5181).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch._dynamo.utils import counters

from muon_ds.newton_schulz import ns_flops
from muon_ds.optim import orthogonalize

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "moonlight-16b-a3b.config.json"


def moonlight_shapes(config: dict) -> Counter:
    """Every hidden matrix Muon orthogonalizes (routers excluded: AdamW), counted by shape."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    nope, rope, value = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    attention = [(heads * (nope + rope), hidden), (config["kv_lora_rank"] + rope, hidden),
                 (heads * (nope + value), config["kv_lora_rank"]), (hidden, heads * value)]
    dense, expert = config["intermediate_size"], config["moe_intermediate_size"]
    shared = expert * config["n_shared_experts"]
    mlp = [(dense, hidden), (dense, hidden), (hidden, dense)]
    moe = [(expert, hidden), (expert, hidden), (hidden, expert)] * config["n_routed_experts"]
    moe += [(shared, hidden), (shared, hidden), (hidden, shared)]
    first_dense = config["first_k_dense_replace"]
    layers = config["num_hidden_layers"]
    return Counter(first_dense * (attention + mlp) + (layers - first_dense) * (attention + moe))


def seconds(fn: Callable[[], None], device: torch.device, repeat: int = 2, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up (kernels, allocator, compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    gpu = torch.cuda.is_available()
    parser.add_argument("--fraction", type=float, default=1.0 if gpu else 0.0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16" if gpu else "float32")
    parser.add_argument("--compile", action="store_true", help="Newton-Schulz through torch.compile (ns_compile)")
    parser.add_argument("--matmul-size", type=int, default=8192 if gpu else 2048, help="of the peak's square matmul")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype)

    def ns(batch: torch.Tensor) -> torch.Tensor:
        return orthogonalize(batch, 5, compiled=args.compile)

    shapes = moonlight_shapes(json.loads(args.config.read_text()))
    work = {shape: max(1, round(count * args.fraction)) for shape, count in shapes.items()}
    stacks = {shape: torch.randn(count, *shape, device=device, dtype=dtype) for shape, count in work.items()}
    flops = sum(count * ns_flops(shape) for shape, count in work.items())

    size = args.matmul_size
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    peak = 2 * size**3 / seconds(lambda: a @ b, device, repeat=20 if gpu else 5)
    repeat, warm = (2, True) if gpu else (1, args.compile)  # CPU: one timed pass of large matrices
    graphs = counters["stats"]["unique_graphs"]
    print(f"{sum(work.values())} of Moonlight-16B-A3B's {sum(shapes.values())} matrices "
          f"({len(shapes)} shapes), {flops / 1e12:.2f} TFLOP per Newton-Schulz pass, {args.dtype} on "
          f"{torch.cuda.get_device_name() if gpu else 'CPU'}{', torch.compile' if args.compile else ''}")
    print("| mode | seconds | TFLOP/s | % of measured matmul peak |\n|---|---|---|---|")

    def row(mode: str, elapsed: float, work_flops: float) -> None:
        print(f"| {mode} | {elapsed:.3f} | {work_flops / elapsed / 1e12:.2f} | {100 * work_flops / elapsed / peak:.0f} |",
              flush=True)

    row(f"{size}^3 matmul", 2 * size**3 / peak, 2 * size**3)
    # Each call overwrites its batch (normalized, then an iterate): the next call starts from those finite values.
    batched = 0.0
    for shape, g in stacks.items():
        elapsed = seconds(lambda: ns(g), device, repeat, warm)
        batched += elapsed
        row(f"batched {len(g)} x {shape[0]}x{shape[1]}", elapsed, len(g) * ns_flops(shape))
    row("batched by shape", batched, flops)
    single = seconds(lambda: [ns(g[i:i + 1]) for g in stacks.values() for i in range(len(g))], device, repeat, warm)
    row("one matrix at a time", single, flops)
    if args.compile:
        print(f"torch.compile: {counters['stats']['unique_graphs'] - graphs} graphs compiled")
    if gpu:
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

if __name__ == "__main__":
    main()
