"""How close the Muon step is to its unavoidable work: Newton-Schulz plus one pass of elementwise updates.

For a host-bound model (thousands of small matrices) and an NS-bound one (a few large ones), single
process and 2 ranks (gloo, a ZeRO-1-like flat partition: the boundary cuts a matrix; as under ZeRO, the
engine's finite-gradient check is not part of the step), it prints:
the step time; the NS time of the same matrices (each rank's owned ones) batched by shape; the time of the
ideal foreach elementwise work (momentum, Nesterov, weight decay, update on the rank's tensors); the
ratio step / (NS + elementwise) (target <= 1.15); and the peak temporary memory of a step over the bf16
size of the rank's Muon elements (target <= 1.5), from the allocations torch records (CUDA's allocator
statistics, the profiler's memory events on CPU). Every timed call starts with cold caches.

    python benchmarks/optimizer_step.py [--repeats 5] [--ns-dtype bfloat16] [--models host,ns] [--worlds 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

MODELS = {  # name: (count, rows, cols) per shape
    "host": [(1536, 32, 64), (1536, 64, 32)],
    "ns": [(2, 512, 1536), (2, 1536, 512)],
}
LR, WD, MOMENTUM = 0.02, 0.1, 0.95
# Elements before the first matrix in the flat buffer (a ZeRO buffer's norms and biases): without them
# both models' matrices would split evenly at W=2 and no matrix would be cut, nothing exchanged.
LEADING = 1000


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Bytes written before every timed call, beyond the last-level cache (the dev machine's L3: 480 MB; an
# H100/H200's L2: 50-60 MB), so that each call starts cold, as a step does after forward and backward: warm,
# the ideal elementwise work measured 30-45% faster on the dev machine than inside a step.
CACHE_FLUSH_BYTES = 512 << 20


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` calls of ``fn`` after one warm-up call, each with cold caches and all ranks
    started together (the minimum: on a shared machine the other timings measure the neighbours)."""
    junk = torch.empty(CACHE_FLUSH_BYTES, dtype=torch.uint8, device=device())
    fn()
    times = []
    for _ in range(repeats):
        junk.fill_(1)
        if dist.is_initialized():
            dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_temporary_bytes(fn: Callable[[], object]) -> int:
    """Memory a call needs beyond what exists before it: on CUDA the caching allocator's peak, on CPU the
    peak of the running sum of the allocations and frees the profiler records (every tensor torch makes)."""
    if torch.cuda.is_available():
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        fn()
    events = [e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def build(model: str, ns_dtype: str, rank: int, world: int):
    """The model's matrices (identical on every rank), a Muon over them and this rank's tensors."""
    from muon_ds.optim import Muon
    from muon_ds.partition import partitioned_layout

    gen = torch.Generator().manual_seed(0)
    shapes = [(rows, cols) for count, rows, cols in MODELS[model] for _ in range(count)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device()) * 0.02) for s in shapes]
    named = [(f"layers.{i}.weight", p) for i, p in enumerate(params)]
    opt = Muon(named, lr=LR, weight_decay=WD, momentum=MOMENTUM, ns_dtype=ns_dtype)
    (group,) = opt.param_groups
    if world == 1:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device())
        return opt, params, [(p.shape, 1) for p in params], sum(p.numel() for p in params)
    total = LEADING + sum(p.numel() for p in params)
    size = -(-total // world)
    flat = torch.zeros(size * world, device=device())
    spans, offset = [], LEADING
    for p in params:
        flat[offset:offset + p.numel()] = p.detach().reshape(-1)
        spans.append((opt.views[p][0], offset))
        offset += p.numel()
    part = torch.nn.Parameter(flat[rank * size:(rank + 1) * size].clone())
    part.grad = torch.randn(size, generator=gen).to(device())
    layout = partitioned_layout(spans, size, rank, world, group["ns_steps"], dist.group.WORLD)
    group["params"] = [part]
    opt.set_layout(group, layout)
    opt.engine_checks_overflow = True  # as under ZeRO, whose engine checks the gradients (deepspeed/layouts.py)
    owned = [(m.shape, 1) for m in layout.plan.owned(rank)]
    return opt, [part], owned, size


def ns_batched(owned, ns_dtype: str) -> Callable[[], object]:
    """Newton-Schulz alone, in place on one NS-dtype batch per shape (all of the shape's matrices)."""
    from muon_ds.newton_schulz import newton_schulz_

    counts: dict[tuple[int, int], int] = defaultdict(int)
    for shape, n in owned:
        counts[tuple(shape)] += n
    dtype = getattr(torch, ns_dtype)
    batches = [torch.randn(n, *shape, device=device()).to(dtype) for shape, n in counts.items()]
    return lambda: [newton_schulz_(b) for b in batches]


def elementwise(tensors: list[torch.Tensor]) -> Callable[[], object]:
    """The ideal non-NS work: m <- mu m + g, u <- g + mu m, W <- W (1 - lr wd) - lr s u, as foreach ops."""
    grads = [torch.randn_like(t) for t in tensors]
    momenta = [torch.zeros_like(t) for t in tensors]
    weights = [t.detach().clone() for t in tensors]

    def run() -> None:
        torch._foreach_mul_(momenta, MOMENTUM)
        torch._foreach_add_(momenta, grads)
        nesterov = torch._foreach_add(grads, momenta, alpha=MOMENTUM)
        torch._foreach_mul_(weights, 1 - LR * WD)
        torch._foreach_add_(weights, nesterov, alpha=-LR)

    return run


def measure(model: str, ns_dtype: str, repeats: int, rank: int, world: int) -> dict[str, float]:
    opt, tensors, owned, local_numel = build(model, ns_dtype, rank, world)
    opt.step()  # momentum buffers exist from here on
    step = timed(opt.step, repeats)
    ns = timed(ns_batched(owned, ns_dtype), repeats)
    ew = timed(elementwise(tensors), repeats)
    memory = peak_temporary_bytes(opt.step) / (2 * local_numel)
    return {"step": step, "ns": ns, "elementwise": ew, "ratio": step / (ns + ew), "memory": memory}


def rank_main(model: str, ns_dtype: str, repeats: int) -> None:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = measure(model, ns_dtype, repeats, rank, world)
    everyone: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(everyone, result)
    if rank == 0:
        worst = {k: max(r[k] for r in everyone) for k in result}
        print("RESULT", json.dumps(worst), flush=True)
    dist.barrier()  # no rank tears its group down while a peer still uses it
    dist.destroy_process_group()


def run_world(model: str, ns_dtype: str, repeats: int, world: int) -> dict[str, float]:
    """One launch of ``world`` ranks in fresh processes."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000 + world),
               WORLD_SIZE=str(world),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world))),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-of", model, "--ns-dtype", ns_dtype,
                               "--repeats", str(repeats)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outputs = [p.communicate()[0] for p in procs]
    failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode]
    if failed:
        rank, code = failed[0]
        raise RuntimeError(f"{model} at W={world}: rank {rank} exited with {code}:\n{outputs[rank][-3000:]}")
    line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--models", default="host,ns")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.ns_dtype, args.repeats)
        return
    print(f"device: {device()}, NS dtype {args.ns_dtype}, fastest of {args.repeats}; worst rank shown")
    print("| model | matrices | W | step ms | NS ms (batched) | elementwise ms | step / (NS + elementwise) "
          "| peak temp / bf16 Muon |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        count = sum(c for c, _r, _c in MODELS[model])
        shapes = ", ".join(f"{c} x {r}x{k}" for c, r, k in MODELS[model])
        for world in map(int, args.worlds.split(",")):
            r = run_world(model, args.ns_dtype, args.repeats, world)
            print(f"| {model} ({shapes}) | {count} | {world} | {r['step'] * 1e3:.1f} | {r['ns'] * 1e3:.1f} | "
                  f"{r['elementwise'] * 1e3:.2f} | {r['ratio']:.2f} | {r['memory']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
