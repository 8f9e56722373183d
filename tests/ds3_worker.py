"""Test support: one rank of the ZeRO-3 scenarios; ``python -m tests.ds3_worker OUT SCENARIO...``.

Every scenario runs in the same process group; rank 0 saves what the tests compare in OUT/z3_w{W}.pt
and each rank removes the shared-memory buffers DeepSpeed's CPU all-reduce leaves behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import deepspeed
import torch
import torch.distributed as dist

import muon_ds  # noqa: F401  (activates "type": "Muon")
from muon_ds.deepspeed import layouts
from muon_ds.newton_schulz import ns_flops
from muon_ds.optim import Muon
from muon_ds.partition import GroupLayout, per_parameter_layouts
from tests.distributed import REPO
from tests.ds_scenarios import GLOBAL_BATCH, OPTIONS, STEPS, ds_config, make_model
from tests.ds_worker import TinyMoE, _error_of, all_ranks, fragmented, train

SCENARIOS: dict[str, Callable[[Path], Any]] = {}


def z3(world: Optional[int] = None, accumulation: int = 1, **zero: Any) -> dict[str, Any]:
    world = dist.get_world_size() if world is None else world
    return ds_config(3, world, accumulation, zero_optimization={"stage": 3, **zero})


def build(config: dict[str, Any], zero_init: bool = False, seed: int = 0) -> deepspeed.DeepSpeedEngine:
    """The engine; with ``zero_init`` the model is built partitioned, as HF Trainer does under ZeRO-3."""
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = make_model(seed)
    else:
        model = make_model(seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def full_weights(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The whole parameters (gathered from their ZeRO-3 partitions) in float32."""
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def matrix_keys(engine: deepspeed.DeepSpeedEngine) -> list[str]:
    return sorted(view.key for views in engine.basic_optimizer.views.values() for view in views)


def momentum(engine: deepspeed.DeepSpeedEngine) -> list[torch.Tensor]:
    """Muon's momentum buffers: ZeRO-3 keys them by its flat fp32 partitions (one per sub-group)."""
    return [state["momentum_buffer"].clone() for state in engine.basic_optimizer.state.values()
            if "momentum_buffer" in state]


def trained(config: dict[str, Any], zero_init: bool = False) -> dict[str, Any]:
    engine = build(config, zero_init)
    train(engine, range(STEPS))
    tagged = [n for n, p in engine.module.named_parameters() if hasattr(p, "use_muon")]
    return {"weights": full_weights(engine), "matrices": matrix_keys(engine), "builtin_muon": engine.optimizer.use_muon,
            "use_muon_tags": tagged, "sub_groups": len(engine.optimizer.fp16_groups),
            "wrapper": type(engine.optimizer).__name__}


def fragments_separately(sub_groups: Any, rank: int, world_size: int, ns_steps: int,
                         process_group: Any = None) -> list[GroupLayout]:
    """The positive control: each rank orthogonalizes its own pieces as if they were whole matrices."""
    return [fragmented(real, ns_steps)
            for real in per_parameter_layouts(sub_groups, rank, world_size, ns_steps, process_group)]


def control(out: Path) -> dict[str, Any]:
    real = layouts.per_parameter_layouts
    layouts.per_parameter_layouts = fragments_separately
    try:
        return trained(z3())
    finally:
        layouts.per_parameter_layouts = real


def skip_check() -> dict[str, Any]:
    """Step 0, then a step whose gradient is NaN on one rank (skipped whole, momentum kept), then two more."""
    engine = build(z3())
    train(engine, range(1))
    before_w, before_m = full_weights(engine), momentum(engine)
    train(engine, range(1, 2), poison_step=1)
    after_w, after_m = full_weights(engine), momentum(engine)
    same_w = all(torch.equal(before_w[k], after_w[k]) for k in before_w)
    same_m = len(before_m) == len(after_m) > 0 and all(torch.equal(a, b) for a, b in zip(before_m, after_m))
    train(engine, range(2, 4))
    moved = not all(torch.equal(after_w[k], v) for k, v in full_weights(engine).items())
    return {"weights_same": all_ranks(same_w), "momentum_same": all_ranks(same_m),
            "skipped": engine.skipped_steps, "muon_skipped": engine.basic_optimizer.skipped_steps, "moved": moved}


def saved(out: Path) -> dict[str, Any]:
    """The 16-bit model file (gathered on save) and zero_to_fp32 on the checkpoint, beside the trained weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = z3(stage3_gather_16bit_weights_on_model_save=True)
    engine = build(config)
    train(engine, range(STEPS))
    engine.save_16bit_model(str(out / "z3_16bit"), "model.bin")
    engine.save_checkpoint(str(out / "z3_ckpt"), tag="final")
    dist.barrier()
    result: dict[str, Any] = {"weights": full_weights(engine)}
    if dist.get_rank() == 0:
        result["model_file"] = torch.load(out / "z3_16bit" / "model.bin", weights_only=True)
        result["zero_to_fp32"] = get_fp32_state_dict_from_zero_checkpoint(str(out / "z3_ckpt"), tag="final")
    return result


def resume(out: Path) -> dict[str, Any]:
    """Save after 2 steps, train 2 more; a fresh engine (other initial weights) loads and trains the same 2."""
    engine = build(z3())
    train(engine, range(2))
    engine.save_checkpoint(str(out / "z3_resume"), tag="step2")
    train(engine, range(2, 4))
    fresh = build(z3(), seed=1)
    fresh.load_checkpoint(str(out / "z3_resume"), tag="step2")
    train(fresh, range(2, 4))
    return {"continued": full_weights(engine), "resumed": full_weights(fresh)}


def layout_stats() -> dict[str, Any]:
    """What the ZeRO-3 plans compute and move, and how big each rank's momentum is."""
    engine = build(z3())
    train(engine, range(1))
    found = layouts.stage3_layouts(engine.optimizer, engine.basic_optimizer)
    plans = [layout.plan for layout in found.values()]
    sizes = {k: m.shape for plan in plans for k, m in plan.matrices.items()}
    momentum_numel = torch.tensor(float(sum(m.numel() for m in momentum(engine))))
    everyone = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, momentum_numel)
    return {"flops": [sum(plan.flops[r] for plan in plans) for r in range(dist.get_world_size())],
            "matrix_flops": [ns_flops(shape) for shape in sizes.values()],
            "muon_numel": sum(a * b for a, b in sizes.values()),
            "moved_numel": sum(plan.bytes_moved(1) for plan in plans),
            "momentum_numel": [int(x) for x in everyone]}


def errors() -> dict[str, str]:
    """What ZeRO-3 still refuses, and a misspelled optimizer block."""
    cases = {
        "offload_optimizer": z3(offload_optimizer={"device": "cpu"}),
        "offload_param": z3(offload_param={"device": "cpu"}),
        "parms": {**z3(), "optimizer": {"type": "Muon", "parms": {"lr": 0.5}}},
    }
    found = {name: _error_of(lambda c=config: build(c)) for name, config in cases.items()}

    def moe() -> Any:
        model = TinyMoE(ep_size=1)
        return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=z3())

    found["moe"] = _error_of(moe)
    return found


def client_optimizer(zero_init: bool) -> dict[str, Any]:
    """A Muon made by the user and passed to initialize, at ZeRO-3 (the model maybe built under zero.Init)."""
    config = {k: v for k, v in z3().items() if k != "optimizer"}
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = make_model()
    else:
        model = make_model()
    engine, *_ = deepspeed.initialize(model=model, optimizer=Muon(model.named_parameters(), **OPTIONS), config=config)
    train(engine, range(STEPS))
    return {"weights": full_weights(engine), "matrices": matrix_keys(engine)}


def shipped_config(name: str) -> dict[str, Any]:
    """A config from configs/deepspeed/, with the batch sizes of this world."""
    config = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
    config.pop("train_batch_size", None)
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // dist.get_world_size()
    return config


def trains(config: dict[str, Any]) -> dict[str, Any]:
    """Initialize with ``config`` and take STEPS steps: the wrapper DeepSpeed chose and the weights."""
    engine = build(config)
    train(engine, range(STEPS))
    return {"wrapper": type(engine.optimizer).__name__, "weights": full_weights(engine)}


WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": OPTIONS["lr"],
                                         "warmup_num_steps": 10, "warmup_type": "linear"}}


def skip_is_counted(config: dict[str, Any]) -> dict[str, Any]:
    """A skipped step must count as skipped and hold the lr schedule, as the ZeRO-1/2 wrappers do."""
    engine = build({**config, "scheduler": WARMUP})
    train(engine, range(1))
    lr, schedule = engine.get_lr()[0], engine.lr_scheduler.last_batch_iteration
    before = full_weights(engine)
    train(engine, range(1, 2), poison_step=1)
    held = (engine.get_lr()[0] == lr and engine.lr_scheduler.last_batch_iteration == schedule)
    same = all(torch.equal(before[k], v) for k, v in full_weights(engine).items())
    skipped = engine.skipped_steps
    train(engine, range(2, 3))
    return {"skipped": skipped, "lr_held": held, "weights_same": all_ranks(same),
            "lr_moves_again": engine.get_lr()[0] > lr}


def _register() -> None:
    for accumulation in (1, 2):
        for init in (False, True):
            name = f"s3_ga{accumulation}" + ("_init" if init else "")
            SCENARIOS[name] = lambda out, a=accumulation, i=init: trained(z3(accumulation=a), zero_init=i)
    SCENARIOS["s3_subgroups"] = lambda out: trained(z3(accumulation=2, sub_group_size=100), zero_init=True)
    SCENARIOS["s3_clip"] = lambda out: trained({**z3(), "gradient_clipping": 0.05})
    SCENARIOS["s3_bf16"] = lambda out: trained({**z3(), "bf16": {"enabled": True}})
    SCENARIOS["s3_control"] = control
    SCENARIOS["s3_nan_skip"] = lambda out: skip_check()
    SCENARIOS["s3_saved"] = saved
    SCENARIOS["s3_resume"] = resume
    SCENARIOS["s3_layout"] = lambda out: layout_stats()
    SCENARIOS["s3_errors"] = lambda out: errors()
    SCENARIOS["s3_client"] = lambda out: client_optimizer(zero_init=False)
    SCENARIOS["s3_client_init"] = lambda out: client_optimizer(zero_init=True)
    for stage in (0, 3):
        SCENARIOS[f"z{stage}_bf16_shipped"] = lambda out, s=stage: trains(shipped_config(f"zero{s}_bf16.json"))
    SCENARIOS["z0_bf16"] = lambda out: trains(ds_config(0, dist.get_world_size(), bf16={"enabled": True}))
    SCENARIOS["z0_fp16"] = lambda out: trains(ds_config(0, dist.get_world_size(),
                                                        fp16={"enabled": True, "loss_scale": 1024}))
    for stage in (0, 1, 3):
        SCENARIOS[f"skip_counted_s{stage}"] = lambda out, s=stage: skip_is_counted(ds_config(s, dist.get_world_size()))
    SCENARIOS["skip_counted_s0_bf16"] = lambda out: skip_is_counted(
        ds_config(0, dist.get_world_size(), bf16={"enabled": True}))


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")  # tests.distributed.run_ranks removes its /dev/shm buffers
    results = {name: SCENARIOS[name](out) for name in names}
    if dist.get_rank() == 0:
        torch.save(results, out / f"z3_w{dist.get_world_size()}.pt")
    dist.barrier()
    dist.destroy_process_group()  # no communication thread left running into interpreter shutdown


_register()

if __name__ == "__main__":
    main()
