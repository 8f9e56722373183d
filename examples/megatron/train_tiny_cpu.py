"""Train a tiny Moonlight with megatron-core alone and muon_ds's Muon: no Megatron-LM checkout, no GPU needed.

    torchrun --nproc-per-node 2 examples/megatron/train_tiny_cpu.py            # 2 CPU ranks (gloo)
    torchrun --nproc-per-node 2 examples/megatron/train_tiny_cpu.py --ep 2     # experts split over the ranks

The model is muon_ds's Moonlight spec (MLA, first layer dense, sigmoid-routed experts with expert bias,
shared experts, untied head) built from an HF config.json (default: the tiny one in tests/data); the data
are byte tokens of the Python standard library's text files, about 1 file in 40 held out (the demo's
examples/demo/corpus.py). The loop is
megatron-core's: Megatron DDP with the distributed optimizer (ZeRO-1), ``get_forward_backward_func``,
``finalize_model_grads`` (which also updates the routers' expert bias) and muon_ds's
``get_megatron_optimizer`` with Moonlight's settings: Muon on the hidden matrices, AdamW on the rest,
the same learning rate and weight decay. It prints the training loss and the held-out loss before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository root, for the examples' modules (and tests' CPU support)
from examples.demo import corpus  # noqa: E402
DEFAULT_CONFIG = REPO / "tests" / "data" / "moonlight-tiny.config.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-config", type=Path, default=DEFAULT_CONFIG, help="a Moonlight HF config.json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per data-parallel rank")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3, help="Muon and AdamW alike (Moonlight's recipe)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (with sequence parallelism)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--data", type=Path, default=None, help="text to train on (default: Python's stdlib)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def batches(text: torch.Tensor, rows: int, seq: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's (tokens, labels) windows; every rank draws the same global batch."""
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(text) - seq - 1, (rows * dp,), generator=generator)[rank * rows:(rank + 1) * rows]
        window = corpus.windows(text, starts, seq + 1)
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()


def setup(args: argparse.Namespace) -> str:
    """Process group and Megatron's parallel state; returns the device. CPU: gloo plus test-support patches."""
    if "RANK" not in os.environ:
        raise SystemExit("start me with torchrun: torchrun --nproc-per-node 2 examples/megatron/train_tiny_cpu.py")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world % (args.tp * args.ep):
        raise SystemExit(f"world size {world} is not divisible by --tp {args.tp} x --ep {args.ep}")
    if not torch.cuda.is_available():
        # megatron-core assumes CUDA in places; tests/megatron_cpu*.py patch those in this process only.
        # They are TEST SUPPORT for running the tiny model on CPU ranks: on GPUs nothing is patched.
        from tests import megatron_cpu, megatron_cpu_optim

        megatron_cpu_optim.apply()
        megatron_cpu.init_process(rank, world, int(os.environ["MASTER_PORT"]), tp=args.tp, ep=args.ep)
        torch.manual_seed(args.seed)
        return "cpu"
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep)
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    return "cuda"


def build(args: argparse.Namespace, device: str) -> tuple[Any, Any, Any]:
    """The tiny Moonlight in Megatron DDP (distributed optimizer) and muon_ds's Megatron Muon."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from muon_ds.megatron import get_megatron_optimizer, moonlight_optimizer_config
    from muon_ds.models.config import architecture_from_hf, load_hf_config, mla_transformer_config
    from muon_ds.models.spec import build_moonlight_model

    hf = load_hf_config(args.hf_config)
    arch = architecture_from_hf(hf)
    bf16 = device == "cuda"
    config = mla_transformer_config(hf, tensor_model_parallel_size=args.tp, sequence_parallel=args.tp > 1,
                                    expert_model_parallel_size=args.ep, use_cpu_initialization=True,
                                    params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                                    finalize_model_grads_func=finalize_model_grads)
    model = build_moonlight_model(config, arch.vocab_size, arch.max_sequence_length).to(device)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                                        use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(moonlight_optimizer_config(lr=args.lr, min_lr=args.lr,
                                                                  weight_decay=args.weight_decay, adam_beta1=0.9,
                                                                  adam_beta2=0.95, clip_grad=1.0, bf16=bf16,
                                                                  use_distributed_optimizer=True), [ddp])
    config.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, arch


def _forward_step(data: Iterator[tuple[torch.Tensor, torch.Tensor]], model: Any) -> tuple[torch.Tensor, Any]:
    tokens, labels = next(data)
    device = next(model.parameters()).device
    tokens, labels = tokens.to(device), labels.to(device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    losses = model(input_ids=tokens, position_ids=positions, attention_mask=None, labels=labels)

    def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach()}

    return losses, loss_func


def run_batch(ddp: Any, data: Iterator[tuple[torch.Tensor, torch.Tensor]], seq: int, rows: int,
              forward_only: bool) -> float:
    """One forward (and backward) of a batch with megatron-core's schedule; the loss averaged over data ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=data, model=[ddp],
                                      num_microbatches=1, seq_length=seq, micro_batch_size=rows,
                                      forward_only=forward_only)
    loss = torch.stack([o["lm loss"] for o in out]).mean().reshape(1)
    dist.all_reduce(loss, group=ps.get_data_parallel_group())
    return loss.item() / ps.get_data_parallel_world_size()


def main(argv: list[str] | None = None) -> None:
    from megatron.core import parallel_state

    args = parse_args(argv)
    if not args.hf_config.exists():
        raise SystemExit(f"--hf-config {args.hf_config} not found")
    device = setup(args)
    rank0 = dist.get_rank() == 0
    root = args.data or corpus.default_root()
    corpus.check_root(root, args.seq_length)
    text, validation = corpus.split(root)
    ddp, optimizer, arch = build(args, device)
    if arch.vocab_size < 256:
        raise SystemExit(f"byte tokens need a vocabulary of at least 256; {args.hf_config} has {arch.vocab_size}")
    held_out = list(zip(range(4), batches(validation, args.micro_batch_size, args.seq_length, args.seed + 1)))

    def validate() -> float:
        ddp.eval()
        with torch.no_grad():
            loss = sum(run_batch(ddp, iter([b]), args.seq_length, args.micro_batch_size, True) for _, b in held_out)
        ddp.train()
        return loss / len(held_out)

    before = validate()
    if rank0:
        print(f"held-out loss before training: {before:.4f}", flush=True)
    data = batches(text, args.micro_batch_size, args.seq_length, args.seed)
    losses, start = [], time.time()
    dp = parallel_state.get_data_parallel_world_size()
    for step in range(1, args.steps + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses.append(run_batch(ddp, data, args.seq_length, args.micro_batch_size, False))
        updated, grad_norm, _ = optimizer.step()
        if rank0 and (step % 5 == 0 or step == 1):
            tokens = step * args.micro_batch_size * args.seq_length * dp
            print(f"step {step:4d}  loss {losses[-1]:.4f}  grad-norm {grad_norm:.3f}  "
                  f"{tokens / (time.time() - start):.0f} tokens/s", flush=True)
    after = validate()
    if rank0:
        print(f"held-out loss after {args.steps} steps: {after:.4f} (before: {before:.4f})", flush=True)
        print("RESULT " + json.dumps({"train_losses": losses, "held_out_before": before, "held_out_after": after}))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
