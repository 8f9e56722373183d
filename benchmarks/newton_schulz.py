"""Newton-Schulz throughput on Moonlight-16B-A3B's matrix shapes: batched by shape vs one at a time.

``python benchmarks/newton_schulz.py [--config CONFIG.json] [--fraction F]`` prints TFLOP/s next to
the device's own matmul peak measured in the same run (bf16 on GPUs, float32 on CPUs by default).
``--fraction`` orthogonalizes that share of each shape's matrices, at least one (the CPU default: one).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from muon_ds.newton_schulz import ns_flops, orthogonalize

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


def seconds(fn: Callable[[], None], device: torch.device, repeat: int = 2) -> float:
    if device.type == "cuda":
        fn()  # warm-up (kernels, allocator)
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
    parser.add_argument("--compile", action="store_true", help="torch.compile the Newton-Schulz function")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype)
    ns = torch.compile(orthogonalize) if args.compile else orthogonalize

    shapes = moonlight_shapes(json.loads(args.config.read_text()))
    work = {shape: max(1, round(count * args.fraction)) for shape, count in shapes.items()}
    stacks = {shape: torch.randn(count, *shape, device=device) for shape, count in work.items()}
    flops = sum(count * ns_flops(shape) for shape, count in work.items())

    size = 8192 if gpu else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    peak = 2 * size**3 / seconds(lambda: a @ b, device, repeat=5)
    repeat = 2 if gpu else 1
    batched = seconds(lambda: [ns(g, 5, dtype) for g in stacks.values()], device, repeat)
    single = seconds(lambda: [ns(m, 5, dtype) for g in stacks.values() for m in g], device, repeat)
    print(f"{sum(work.values())} of Moonlight-16B-A3B's {sum(shapes.values())} matrices "
          f"({len(shapes)} shapes), {flops / 1e12:.2f} TFLOP per Newton-Schulz pass, {args.dtype} on "
          f"{torch.cuda.get_device_name() if gpu else 'CPU'}{', torch.compile' if args.compile else ''}")
    print("| mode | seconds | TFLOP/s | % of measured matmul peak |\n|---|---|---|---|")
    print(f"| {size}^3 matmul | - | {peak / 1e12:.2f} | 100 |")
    for mode, elapsed in (("batched by shape", batched), ("one matrix at a time", single)):
        print(f"| {mode} | {elapsed:.3f} | {flops / elapsed / 1e12:.2f} | {100 * flops / elapsed / peak:.0f} |")


if __name__ == "__main__":
    main()
