"""``python -m examples.demo``: train a tiny Moonlight with Muon and with AdamW, plot and compare.

Everything is checked (settings file, data directory, world size, devices) before any training.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

from examples.demo import corpus, report
from examples.demo.settings import HERE, OPTIMIZERS, Settings, check_world, load
from examples.demo.worker import run_rank


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--config", type=Path, default=None,
                        help="settings YAML (default: examples/demo/gpu.yaml with GPUs, else cpu.yaml)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: from the settings)")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per run (default: settings)")
    parser.add_argument("--data", type=Path, default=None,
                        help="directory of text files (default: this Python's standard library)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    return parser.parse_args(argv)


def pick_device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU; use --device cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def world_size_for(args: argparse.Namespace, settings: Settings, device: str) -> int:
    import torch

    world = args.world_size or settings.train.world_size
    if device == "cuda":
        gpus = torch.cuda.device_count()
        world = world or gpus
        if world > gpus:
            raise SystemExit(f"error: world size {world} but only {gpus} GPUs are visible; lower --world-size")
    world = world or 2
    if world < 1:
        raise SystemExit(f"error: --world-size must be at least 1, got {world}")
    return world


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    settings = load(args.config or HERE / ("gpu.yaml" if device == "cuda" else "cpu.yaml"))
    if args.tokens is not None:
        settings.train.tokens = args.tokens
    world = world_size_for(args, settings, device)
    check_world(settings, world)
    data = (args.data or corpus.default_root()).resolve()
    corpus.check_root(data, settings.train.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # the ranks' DeepSpeed must not pick up a GPU

    import torch.multiprocessing as mp

    train = settings.train
    print(f"demo: {train.steps} steps x {train.tokens_per_step:,} tokens per run, {world} {device} ranks, "
          f"DeepSpeed ZeRO-{settings.deepspeed.get('zero_optimization', {}).get('stage', 0)}, "
          f"lr={settings.optimizer.lr} weight_decay={settings.optimizer.weight_decay}; data: {data}")
    start = time.perf_counter()
    for optimizer in args.optimizers:
        mp.spawn(run_rank, nprocs=world, join=True, args=(
            world, settings.model_dump_json(), optimizer, str(args.out), str(data), free_port(), device))
    table = report.summarize(args.out, tuple(args.optimizers))
    print(f"\n{table}\n\nplot: {args.out / 'loss_vs_tokens.png'}  table: {args.out / 'results.md'}  "
          f"total time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
