"""Test support: one rank of the checkpoint scenarios; ``python -m tests.dsckpt_worker OUT ACTION...``.

``save`` trains 2 steps at this world size and saves with muon_ds's crash-safe save (ZeRO 1 and 2,
and an AdamW checkpoint); ``resume`` loads those at this world size and trains steps 2 and 3;
``control`` does the same with Muon's momentum zeroed after loading. Rank 0 writes OUT/<action>_w<W>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

import muon_ds  # noqa: F401  (activates "type": "Muon")
from muon_ds.deepspeed import checkpoint
from tests.ds3_worker import full_weights
from tests.ds_scenarios import OPTIONS, ds_config, make_model
from tests.ds_worker import engine_for, train

STAGES = (1, 2, 3)


def save(out: Path) -> dict[str, Any]:
    world = dist.get_world_size()
    for stage in STAGES:
        engine = engine_for(ds_config(stage, world))
        train(engine, range(2))
        checkpoint.save(engine, out / f"s{stage}", "step2")
    adamw = engine_for(ds_config(1, world, optimizer={"type": "AdamW", "params": {"lr": OPTIONS["lr"]}}))
    train(adamw, range(2))
    checkpoint.save(adamw, out / "adamw", "step2")
    return {}


def resumed(out: Path, stage: int, zero_momentum: bool = False) -> dict[str, torch.Tensor]:
    engine = engine_for(ds_config(stage, dist.get_world_size()), make_model(seed=1))
    tag, client_state = checkpoint.resume(engine, out / f"s{stage}")
    assert tag == "step2" and engine.global_steps == 2, (tag, engine.global_steps)
    if zero_momentum:  # the positive control: what a converter that drops Muon's state would do
        optimizer = engine.basic_optimizer
        for state in optimizer.state.values():
            if "momentum_buffer" in state:
                state["momentum_buffer"].zero_()
    train(engine, range(2, 4))
    return full_weights(engine)


ACTIONS = {
    "save": save,
    "resume": lambda out: {stage: resumed(out, stage) for stage in STAGES},
    "control": lambda out: {1: resumed(out, 1, zero_momentum=True)},
}


def main() -> None:
    out, actions = Path(sys.argv[1]), sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    for action in actions:
        result = ACTIONS[action](out)
        if dist.get_rank() == 0:
            torch.save(result, out / f"{action}_w{dist.get_world_size()}.pt")
    dist.barrier()
    dist.destroy_process_group()  # no communication thread left running into interpreter shutdown


if __name__ == "__main__":
    main()
