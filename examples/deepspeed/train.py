"""Train a small GPT with DeepSpeed from a JSON config: the script a user already has, unchanged.

Only the config decides the optimizer: with ``"optimizer": {"type": "Muon"}`` and muon_ds installed
(its import hook activates on ``import deepspeed``; ``import muon_ds`` does the same explicitly)
this trains with Moonlight's Muon. Launch with deepspeed, torchrun or srun (see README.md beside it).
Checkpoints go to --checkpoint-dir through muon_ds's crash-safe save (``latest`` only ever names a
checkpoint every rank finished); a run started again resumes from the newest complete one, at any
data-parallel size. SIGUSR1 or SIGTERM (Slurm's preemption warning) makes every rank save and exit so
the job can be requeued. A rank that stalls makes the others fail after $MUON_DS_COLLECTIVE_TIMEOUT
seconds (default 600) instead of waiting forever.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import muon_ds  # noqa: F401  (explicit activation; harmless when the import hook already did it)
from muon_ds.deepspeed import checkpoint, collectives

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for the examples' modules
from examples.deepspeed.tiny_gpt import TinyGPT  # noqa: E402
from examples.demo import corpus  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed-config", required=True, type=Path, help="DeepSpeed JSON (configs/deepspeed/)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--data", type=Path, default=corpus.default_root(), help="text to train on (default: stdlib)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--save-interval", type=int, default=50)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))  # deepspeed launcher
    args = parser.parse_args()
    if not args.deepspeed_config.is_file():
        parser.error(f"--deepspeed-config {args.deepspeed_config}: no such file")
    return args


def main() -> None:
    args = parse_args()
    timeout = collectives.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args)
        dist.barrier()  # no rank tears its group down while a peer still uses it
        dist.destroy_process_group()
    except RuntimeError as err:
        if not collectives.is_peer_failure(err):
            raise
        sys.exit(f"rank {dist.get_rank()}: a collective failed (timeout {timeout.total_seconds():g} s, "
                 f"${collectives.TIMEOUT_ENV}): another rank stalled or died. Start the job again to resume "
                 f"from the newest complete checkpoint. ({type(err).__name__}: {str(err).splitlines()[0]})")


def train(args: argparse.Namespace) -> None:
    config = json.loads(args.deepspeed_config.read_text())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    model = TinyGPT(args.width, args.layers, args.heads, args.seq_len)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    corpus.check_root(args.data, args.seq_len)
    text, _validation = corpus.split(args.data)
    micro = engine.train_micro_batch_size_per_gpu()

    step = 0
    resumed = checkpoint.resume(engine, args.checkpoint_dir) if args.checkpoint_dir is not None else None
    if resumed is not None:
        step = resumed[1]["step"]
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir} at step {step}", flush=True)

    stop = torch.zeros(1)
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.fill_(1))

    def save() -> None:
        # A tag already saved (the final or signal save at an interval step) is left as it is, never rewritten.
        if args.checkpoint_dir is not None:
            checkpoint.save(engine, args.checkpoint_dir, f"step{step}", client_state={"step": step})

    while step < args.steps:
        for micro_step in range(engine.gradient_accumulation_steps()):
            generator = torch.Generator().manual_seed(args.seed + (step * 1000 + micro_step) * world + rank)
            starts = torch.randint(0, len(text) - args.seq_len - 1, (micro,), generator=generator)
            tokens = corpus.windows(text, starts, args.seq_len + 1).to(engine.device)
            loss = engine(tokens)
            engine.backward(loss)
            engine.step()
        step += 1
        if rank == 0 and (step % args.log_interval == 0 or step == 1):
            print(f"step {step} loss {loss.item():.4f} lr {engine.get_lr()[0]:.3e}", flush=True)
        if step % args.save_interval == 0:
            save()
        flag = stop.clone()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank saves together
        if flag.item():
            save()
            if rank == 0:
                print(f"signal received: saved step {step} for requeue", flush=True)
            return
    save()


if __name__ == "__main__":
    main()
