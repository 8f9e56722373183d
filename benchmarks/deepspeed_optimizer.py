"""Benchmark: muon_ds's Muon vs DeepSpeed's AdamW and built-in Muon under ZeRO-1 and ZeRO-3, at W = 1, 2, 4.

``python benchmarks/deepspeed_optimizer.py [--stages 1,3] [--worlds 1,2,4]`` launches each configuration
with torchrun on this machine and prints a markdown table: iteration and optimizer-step time, per-rank
Newton-Schulz time and FLOPs, bytes communicated per step beyond AdamW's, optimizer-state memory per rank, and the
iteration-time ratio to AdamW measured in the same run. DeepSpeed's built-in Muon runs in processes
where muon_ds is not activated (``MUON_DS_AUTOLOAD=0``, no import), so the name "Muon" is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single", "broadcast",
               "all_gather", "reduce_scatter", "_all_gather_base", "_reduce_scatter_base")
OPTIMIZERS = ("adamw", "muon_ds", "deepspeed_muon")


def count_collectives(counter: dict[str, int]) -> None:
    """Add up the bytes each collective is given, by wrapping torch.distributed's functions."""
    import torch
    import torch.distributed as dist

    def wrap(fn: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensors = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
            counter["bytes"] += max((t.numel() * t.element_size() for t in tensors), default=0)
            return fn(*args, **kwargs)

        return counted

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name)))


def time_newton_schulz(counter: dict[str, float], optimizer: str) -> None:
    """Accumulate the seconds and FLOPs spent in Newton-Schulz on this rank.

    FLOPs are those of the standard quintic iteration on the same matrices (DeepSpeed's built-in
    Muon defaults to a Gram-space variant, so for it the figure is the equivalent work).
    """
    from muon_ds.newton_schulz import ns_flops

    def timed(fn: Callable) -> Callable:
        def wrapper(g: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(g, *args, **kwargs)
            counter["ns_seconds"] += time.perf_counter() - start
            count = g.shape[0] if g.ndim == 3 else 1
            counter["ns_flops"] += count * ns_flops(tuple(g.shape[-2:]), kwargs.get("steps", 5))
            return out

        return wrapper

    if optimizer == "muon_ds":
        import muon_ds.optim as optim

        optim.orthogonalize = timed(optim.orthogonalize)
    else:
        from deepspeed.runtime.zero.muon import original_muon

        for name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
            setattr(original_muon, name, timed(getattr(original_muon, name)))


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    if args.optimizer == "muon_ds":
        import muon_ds  # noqa: F401
    from examples.deepspeed.tiny_gpt import TinyGPT

    deepspeed.init_distributed(dist_backend="gloo")
    comm = {"bytes": 0}
    counters = {"ns_seconds": 0.0, "ns_flops": 0.0}
    torch.manual_seed(0)
    model = TinyGPT(args.width, args.layers, heads=8, seq_len=args.seq_len)
    name = "AdamW" if args.optimizer == "adamw" else "Muon"
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "optimizer": {"type": name, "params": {"lr": 1e-3, "weight_decay": 0.1}},
              "zero_optimization": {"stage": args.stage}}
    if args.optimizer == "deepspeed_muon":
        config["optimizer"]["params"]["momentum"] = 0.95
        if args.stage == 3:  # the built-in refuses ZeRO-3's reduce-scatter
            config["zero_optimization"]["reduce_scatter"] = False
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    built = type(engine.basic_optimizer).__name__
    expected = {"adamw": ("FusedAdam", "AdamW"), "muon_ds": ("Muon",), "deepspeed_muon": ("MuonWithAuxAdam",)}
    if built not in expected[args.optimizer]:
        raise RuntimeError(f"--optimizer {args.optimizer} built DeepSpeed's {built}")
    if args.optimizer != "adamw":
        time_newton_schulz(counters, args.optimizer)
    count_collectives(comm)
    tokens = torch.randint(0, 256, (args.micro_batch, args.seq_len + 1), generator=torch.Generator().manual_seed(dist.get_rank()))
    iteration, step_time = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            comm["bytes"], counters["ns_seconds"], counters["ns_flops"] = 0, 0.0, 0.0
        dist.barrier()
        start = time.perf_counter()
        engine.backward(engine(tokens))
        before_step = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        if i >= args.warmup:
            iteration.append(end - start)
            step_time.append(end - before_step)
    basic = engine.basic_optimizer
    state_bytes = sum(t.numel() * t.element_size() for s in basic.state.values() for t in s.values()
                      if torch.is_tensor(t))
    result = {"optimizer": args.optimizer, "stage": args.stage, "world": dist.get_world_size(),
              "rank": dist.get_rank(), "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
              "iteration_s": sum(iteration) / len(iteration), "step_s": sum(step_time) / len(step_time),
              "ns_s": counters["ns_seconds"] / args.steps, "ns_gflop": counters["ns_flops"] / args.steps / 1e9,
              "comm_mb": comm["bytes"] / args.steps / 2**20, "state_mb": state_bytes / 2**20}
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


def launch(stage: int, world: int, optimizer: str, args: argparse.Namespace, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    if optimizer == "deepspeed_muon":
        env["MUON_DS_AUTOLOAD"] = "0"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           __file__, "--worker", "--optimizer", optimizer, "--stage", str(stage), "--out", str(out),
           "--width", str(args.width),
           "--layers", str(args.layers), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def table(rows: list[dict[str, Any]], stages: list[int], worlds: list[int]) -> str:
    lines = ["| ZeRO | W | optimizer | iteration s | x AdamW | step s | NS s/rank (max) | NS GFLOP/rank (max) "
             "| comm MB/step/rank beyond AdamW | state MB/rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, world in ((s, w) for s in stages for w in worlds):
        by = {o: [r for r in rows if (r["stage"], r["world"], r["optimizer"]) == (stage, world, o)] for o in OPTIMIZERS}
        if not by["adamw"]:
            continue
        base = max(r["iteration_s"] for r in by["adamw"])
        base_comm = max(r["comm_mb"] for r in by["adamw"])
        for optimizer in OPTIMIZERS:
            rs = by[optimizer]
            if not rs:
                continue
            it = max(r["iteration_s"] for r in rs)
            lines.append(f"| {stage} | {world} | {optimizer} | {it:.3f} | {it / base:.2f} "
                         f"| {max(r['step_s'] for r in rs):.3f} "
                         f"| {max(r['ns_s'] for r in rs):.3f} | {max(r['ns_gflop'] for r in rs):.2f} "
                         f"| {max(r['comm_mb'] for r in rs) - base_comm:.2f} | {max(r['state_mb'] for r in rs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,3")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    worlds = [int(w) for w in args.worlds.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    out = Path(args.out or "/tmp/muon_ds_benchmark.jsonl")
    out.unlink(missing_ok=True)
    for stage in stages:
        for world in worlds:
            for optimizer in OPTIMIZERS:
                try:
                    launch(stage, world, optimizer, args, out)
                except subprocess.CalledProcessError as err:
                    print(f"ZeRO-{stage} W={world} {optimizer} failed:\n{err.stderr.decode()[-2000:]}", file=sys.stderr)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(f"model: {rows[0]['params'] / 1e6:.1f}M parameters, fp32, micro-batch {args.micro_batch} x "
          f"{args.seq_len} tokens per rank, {os.cpu_count()} CPU cores, gloo")
    print(table(rows, stages, worlds))


if __name__ == "__main__":
    main()
