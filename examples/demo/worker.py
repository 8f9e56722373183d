"""One rank of one demo run: build the tiny Moonlight, train it under DeepSpeed, log losses (rank 0)."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def _setup_process(rank: int, world_size: int, port: int, device: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    else:
        torch.cuda.set_device(rank)


def run_rank(rank: int, world_size: int, settings_json: str, optimizer: str, out_dir: str, data_root: str,
             port: int, device: str) -> None:
    """Entry point of each spawned rank (``torch.multiprocessing.spawn`` passes ``rank`` first)."""
    _setup_process(rank, world_size, port, device)
    import deepspeed
    import torch.distributed as dist
    from tqdm import tqdm
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import muon_ds  # noqa: F401  (a checkout without `pip install` needs this; the wheel's hook does it too)
    from examples.demo import corpus
    from examples.demo.settings import Settings

    deepspeed.utils.logger.setLevel(logging.ERROR)  # keep the progress bar readable
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    settings = Settings.model_validate_json(settings_json)
    train = settings.train
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")

    train_data, val_data = corpus.split(Path(data_root))
    torch.manual_seed(train.seed)  # the same initial weights for both optimizers
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**settings.model))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=settings.ds_config(optimizer, world_size))
    counts = _check_optimizer(engine, optimizer)

    accumulation = engine.gradient_accumulation_steps()
    val = corpus.validation_batch(val_data, train.val_sequences, train.seq_len)[rank::world_size]
    eval_steps = {round(i * train.steps / train.evals) for i in range(train.evals + 1)}
    history: dict[str, Any] = {"optimizer": optimizer, "world_size": world_size, "device": device,
                               "tokens_per_step": train.tokens_per_step, "counts": counts,
                               "parameters": sum(p.numel() for p in model.parameters()),
                               "train": [], "val": []}
    bar = tqdm(total=train.steps * train.tokens_per_step, unit="tok", unit_scale=True, desc=optimizer,
               disable=rank != 0, dynamic_ncols=True)
    start = time.perf_counter()
    train_seconds = 0.0
    for step in range(train.steps + 1):
        if step in eval_steps:
            history["val"].append([step * train.tokens_per_step, _evaluate(engine, val, train.micro_batch)])
        if step == train.steps:
            break
        tick = time.perf_counter()
        batch = corpus.step_batch(train_data, step, train.seed, train.global_batch, train.seq_len)
        loss_sum = torch.zeros((), device=engine.device)
        for micro in range(accumulation):
            first = (micro * world_size + rank) * train.micro_batch
            ids = batch[first:first + train.micro_batch].to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        dist.all_reduce(loss_sum)
        step_loss = loss_sum.item() / (accumulation * world_size)
        train_seconds += time.perf_counter() - tick
        history["train"].append([(step + 1) * train.tokens_per_step, step_loss])
        bar.set_postfix(loss=f"{step_loss:.3f}", val=f"{history['val'][-1][1]:.3f}",
                        tok_s=f"{(step + 1) * train.tokens_per_step / train_seconds:,.0f}", refresh=False)
        bar.update(train.tokens_per_step)
    bar.close()
    history["seconds"] = time.perf_counter() - start
    history["train_tokens_per_second"] = train.steps * train.tokens_per_step / train_seconds
    if rank == 0:
        path = Path(out_dir) / f"{optimizer}.json"
        path.write_text(json.dumps(history))
    dist.barrier()
    dist.destroy_process_group()


def _check_optimizer(engine: Any, optimizer: str) -> list[int]:
    """Refuse to compare against the wrong optimizer: the Muon run must be muon_ds's Muon."""
    from muon_ds.optim import Muon

    built = engine.basic_optimizer
    if optimizer == "muon" and not isinstance(built, Muon):
        raise RuntimeError(f'"type": "Muon" built {type(built).__module__}.{type(built).__name__}, not '
                           "muon_ds.optim.Muon; is muon_ds imported (or installed with its autoload hook)?")
    if isinstance(built, Muon):
        return list(built.counts())
    return []


@torch.no_grad()
def _evaluate(engine: Any, sequences: torch.Tensor, micro_batch: int) -> float:
    """Mean validation loss over all ranks' sequences (each sequence weighs the same)."""
    import torch.distributed as dist

    engine.eval()
    total = torch.zeros(2, device=engine.device)
    for first in range(0, len(sequences), micro_batch):
        ids = sequences[first:first + micro_batch].to(engine.device)
        total[0] += engine(input_ids=ids, labels=ids).loss.float() * len(ids)
        total[1] += len(ids)
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()
