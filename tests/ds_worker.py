"""Test support: one rank of the DeepSpeed scenarios; ``python -m tests.ds_worker OUT SCENARIO...``.

Every scenario runs in the same process group; rank 0 saves what the tests compare in OUT/w{W}.pt.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist

import muon_ds  # noqa: F401  (activates "type": "Muon")
from muon_ds.deepspeed import layouts
from muon_ds.partition import GroupLayout, partitioned_layout
from muon_ds.plan import Holding, Matrix, Piece, make_plan
from muon_ds.newton_schulz import ns_flops
from tests.ds_scenarios import STEPS, TAGGED_ADAMW, VOCAB, WIDTH, ds_config, make_model, micro_batch

SCENARIOS: dict[str, Callable[[Path], Any]] = {}


def scenario(name: str, fn: Callable[[Path], Any]) -> None:
    SCENARIOS[name] = fn


def engine_for(config: dict[str, Any], model: torch.nn.Module | None = None) -> deepspeed.DeepSpeedEngine:
    model = make_model() if model is None else model
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def train(engine: deepspeed.DeepSpeedEngine, steps: range, poison_step: int | None = None) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    accumulation = engine.gradient_accumulation_steps()
    for step in steps:
        for micro in range(accumulation):
            loss = engine(micro_batch(step, micro, rank, world, accumulation))
            if step == poison_step and rank == world - 1:
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()


def weights(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    return weights_of(engine.module)


def scattered_zero0() -> dict[str, torch.Tensor]:
    """ZeRO-0 with the cost model tilted so that each rank orthogonalizes its share and sends the results
    (at this size it would otherwise orthogonalize every matrix on every rank)."""
    from muon_ds import route

    real = route.THROUGHPUT["cpu"]
    route.THROUGHPUT["cpu"] = (1e6, 1e15)
    try:
        return trained(ds_config(0, dist.get_world_size()))
    finally:
        route.THROUGHPUT["cpu"] = real


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def trained(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    engine = engine_for(config)
    train(engine, range(STEPS))
    return weights(engine)


def fragmented(real: GroupLayout, ns_steps: int) -> GroupLayout:
    """The positive control's layout: this rank's pieces of ``real`` orthogonalized as if each were a whole
    matrix, with no exchange."""
    local, matrices, holdings = [], [], []
    for piece, offset in real.local[0]:
        cols = real.plan.matrices[piece.key].shape[1]
        shape = (piece.numel // cols, cols) if piece.numel % cols == 0 else (1, piece.numel)
        fragment = Piece(f"{piece.key}@{piece.start}", piece.block.whole(shape), 0, piece.numel)
        local.append((fragment, offset))
        matrices.append(Matrix(fragment.key, shape))
        holdings.append(Holding(0, fragment))
    return GroupLayout([local], make_plan(matrices, holdings, 1, ns_steps))


def fragments_separately(spans: Any, partition_size: int, rank: int, world_size: int, ns_steps: int,
                         process_group: Any = None) -> GroupLayout:
    """The positive control: each rank orthogonalizes its own fragments as if they were whole matrices."""
    return fragmented(partitioned_layout(spans, partition_size, rank, world_size, ns_steps, process_group), ns_steps)


def control(out: Path) -> dict[str, torch.Tensor]:
    real = layouts.partitioned_layout
    layouts.partitioned_layout = fragments_separately
    try:
        return trained(ds_config(1, dist.get_world_size()))
    finally:
        layouts.partitioned_layout = real


def momentum(engine: deepspeed.DeepSpeedEngine) -> list[torch.Tensor]:
    opt = engine.basic_optimizer
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups if g["use_muon"]
            for p in g["params"] if "momentum_buffer" in opt.state[p]]


def all_ranks(flag: bool) -> bool:
    value = torch.tensor(float(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def skip_check(config: dict[str, Any], poison_step: int) -> dict[str, Any]:
    """Step 0 normally, then a step with a non-finite gradient on one rank: it must be skipped whole."""
    engine = engine_for(config)
    train(engine, range(1))
    before_w, before_m = weights(engine), momentum(engine)
    train(engine, range(1, 2), poison_step=poison_step)
    after_w, after_m = weights(engine), momentum(engine)
    same_w = all(torch.equal(before_w[k], after_w[k]) for k in before_w)
    same_m = len(before_m) == len(after_m) and all(torch.equal(a, b) for a, b in zip(before_m, after_m))
    train(engine, range(2, 4))
    moved = not all(torch.equal(after_w[k], weights(engine)[k]) for k in after_w)
    return {"weights_same": all_ranks(same_w), "momentum_same": all_ranks(same_m), "moved": moved,
            "skipped": engine.skipped_steps, "muon_skipped": engine.basic_optimizer.skipped_steps}


def resume(config: dict[str, Any], out: Path, name: str) -> dict[str, Any]:
    engine = engine_for(config)
    train(engine, range(2))
    engine.save_checkpoint(str(out / name), tag="step2")
    train(engine, range(2, 4))
    continued = weights(engine)
    fresh = engine_for(copy.deepcopy(config), make_model(seed=1))
    fresh.load_checkpoint(str(out / name), tag="step2")
    train(fresh, range(2, 4))
    return {"continued": continued, "resumed": weights(fresh)}


def load_elsewhere(config: dict[str, Any], out: Path, name: str) -> dict[str, Any]:
    """Load a checkpoint saved at another world size (by the scenario ``name``) and train on."""
    engine = engine_for(config, make_model(seed=1))
    try:
        engine.load_checkpoint(str(out / name), tag="step2")
    except Exception as err:  # the test checks that the message says what is wrong
        return {"error": f"{type(err).__name__}: {err}"}
    train(engine, range(2, 4))
    return {"weights": weights(engine)}


class TinyMoE(torch.nn.Module):
    """A DeepSpeed MoE layer (top-1, no token dropping) between an embedding and a head."""

    def __init__(self, ep_size: int) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        expert = torch.nn.Sequential(torch.nn.Linear(WIDTH, 32), torch.nn.Tanh(), torch.nn.Linear(32, WIDTH))
        self.moe = MoE(WIDTH, expert, num_experts=4, ep_size=ep_size, k=1, drop_tokens=False, use_rts=False)
        self.lm_head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        # Distinct experts, each global expert the same whatever the expert-parallel size.
        gate = torch.Generator().manual_seed(1)
        local = self.moe.num_local_experts
        with torch.no_grad():
            for p in self.moe.deepspeed_moe.gate.parameters():
                p.copy_(torch.randn(p.shape, generator=gate) * 0.2)
            for i, expert_module in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                init = torch.Generator().manual_seed(100 + global_expert(i, local, ep_size))
                for p in expert_module.parameters():
                    p.copy_(torch.randn(p.shape, generator=init) * 0.2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens[:, :-1])
        out, _aux, _counts = self.moe(h)
        logits = self.lm_head(h + out)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts."


def global_expert(local_index: int, local_count: int, ep_size: int) -> int:
    """DeepSpeed's MOELayer dispatches to expert-parallel rank r's experts r * local_count + i."""
    ep_rank = dist.get_rank() % ep_size
    return ep_rank * local_count + local_index


def global_names(state: dict[str, torch.Tensor], local_count: int, ep_size: int) -> dict[str, torch.Tensor]:
    """Expert weights of every rank under their global expert numbers (rank 0 gets them all)."""
    renamed = {}
    for key, value in state.items():
        if key.startswith(EXPERTS):
            index, rest = key[len(EXPERTS):].split(".", 1)
            key = f"{EXPERTS}{global_expert(int(index), local_count, ep_size)}.{rest}"
        renamed[key] = value
    everyone: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, renamed)
    return {k: v for theirs in everyone for k, v in theirs.items()}


def moe(stage: int, ep_size: int = 1) -> dict[str, Any]:
    model = TinyMoE(ep_size=ep_size)
    local = model.moe.num_local_experts
    start = global_names({k: v.detach().clone() for k, v in model.state_dict().items()}, local, ep_size)
    engine = engine_for(ds_config(stage, dist.get_world_size()), model)
    train(engine, range(STEPS))
    muon = engine.basic_optimizer
    experts = sorted(v.key for views in muon.views.values() for v in views if "experts" in v.key)
    return {"start": start, "weights": global_names(weights(engine), local, ep_size), "expert_matrices": experts,
            "counts": muon.counts()}


def frozen() -> dict[int, dict[str, bool]]:
    """A frozen (requires_grad=False) hidden matrix stays bit-identical at every ZeRO stage."""
    found = {}
    for stage in (0, 1, 2):
        model = make_model()
        model.mix.weight.requires_grad_(False)
        start = weights_of(model)
        engine = engine_for(ds_config(stage, dist.get_world_size()), model)
        train(engine, range(STEPS))
        end = weights(engine)
        found[stage] = {"frozen_same": all_ranks(torch.equal(start["mix.weight"], end["mix.weight"])),
                        "others_moved": not torch.equal(start["up.weight"], end["up.weight"])}
    return found




def tagged() -> dict[str, torch.Tensor]:
    """A parameter tagged use_muon=False, as for DeepSpeed's built-in Muon: the tag is honoured."""
    model = make_model()
    for name in TAGGED_ADAMW:
        model.get_parameter(name).use_muon = False
    engine = engine_for(ds_config(2, dist.get_world_size()), model)
    train(engine, range(STEPS))
    return weights(engine)


def layout_stats() -> dict[str, Any]:
    """How ZeRO-1 cut the Muon group and what the exchange plan moves and computes."""
    engine = engine_for(ds_config(1, dist.get_world_size()))
    muon = engine.basic_optimizer
    (layout,) = muon.layouts.values()
    plan = layout.plan
    cut = {t.piece.key for t in plan.gathers}
    return {"cut_numel": sum(plan.matrices[k].shape[0] * plan.matrices[k].shape[1] for k in cut),
            "cut_matrices": len(cut), "moved_numel": plan.bytes_moved(1), "flops": plan.flops,
            "matrix_flops": [ns_flops(m.shape) for m in plan.matrices.values()]}


def errors() -> dict[str, str]:
    """The message each unsupported or invalid setting produces (the engine must refuse to build)."""
    world = dist.get_world_size()
    cases = {
        "offload": ds_config(1, world, zero_optimization={"stage": 1, "offload_optimizer": {"device": "cpu"}}),
        "elastic": ds_config(1, world, zero_optimization={"stage": 1, "elastic_checkpoint": True}),
        "unknown_key": ds_config(1, world, optimizer={"type": "Muon", "params": {"lr": 0.1, "momentumm": 0.9}}),
        "bad_value": ds_config(1, world, optimizer={"type": "Muon", "params": {"lr": 0.1, "momentum": 1.5}}),
        "ns_compile_not_boolean": ds_config(1, world, optimizer={"type": "Muon", "params": {"ns_compile": "yes"}}),
    }
    found = {}
    for name, config in cases.items():
        found[name] = _error_of(lambda: engine_for(config))
    model = make_model()
    model.up.bias.use_muon = True
    found["vector_tagged"] = _error_of(lambda: engine_for(ds_config(1, world), model))
    real = deepspeed.__version__
    deepspeed.__version__ = "0.16.4"
    try:
        found["old_deepspeed"] = _error_of(lambda: engine_for(ds_config(1, world)))
    finally:
        deepspeed.__version__ = real
    return found


def _error_of(build: Callable[[], Any]) -> str:
    try:
        build()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: SCENARIOS[name](out) for name in names}
    if dist.get_rank() == 0:
        torch.save(results, out / f"w{dist.get_world_size()}.pt")
    dist.barrier()
    dist.destroy_process_group()  # no communication thread left running into interpreter shutdown


def _register_defaults() -> None:
    for stage in (0, 1, 2):
        for accumulation in (1, 2):
            scenario(f"s{stage}_ga{accumulation}",
                     lambda out, s=stage, a=accumulation: trained(ds_config(s, dist.get_world_size(), a)))
    scenario("s2_no_reduce_scatter", lambda out: trained(
        ds_config(2, dist.get_world_size(), zero_optimization={"stage": 2, "reduce_scatter": False})))
    scenario("s1_no_reduce_scatter", lambda out: trained(
        ds_config(1, dist.get_world_size(), zero_optimization={"stage": 1, "reduce_scatter": False})))
    for stage in (0, 1, 2):
        scenario(f"s{stage}_clip", lambda out, s=stage: trained(
            ds_config(s, dist.get_world_size(), gradient_clipping=0.05)))
    scenario("control", control)
    scenario("s1_bf16_fp32_accumulation", lambda out: trained(
        ds_config(1, dist.get_world_size(), bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})))
    scenario("s1_bf16", lambda out: trained(ds_config(1, dist.get_world_size(), bf16={"enabled": True})))
    scenario("nan_skip_s1", lambda out: skip_check(ds_config(1, dist.get_world_size()), poison_step=1))
    scenario("nan_skip_s0", lambda out: skip_check(ds_config(0, dist.get_world_size()), poison_step=1))
    scenario("nan_skip_s2_bf16", lambda out: skip_check(
        ds_config(2, dist.get_world_size(), bf16={"enabled": True}), poison_step=1))
    scenario("elsewhere_s1_fp32", lambda out: load_elsewhere(ds_config(1, dist.get_world_size()), out,
                                                             "resume_s1_fp32"))
    scenario("moe_s0", lambda out: moe(0))
    scenario("moe_s1", lambda out: moe(1))
    scenario("moe_s2", lambda out: moe(2))
    scenario("moe_ep2_s1", lambda out: moe(1, ep_size=2))
    scenario("moe_ep2_s2", lambda out: moe(2, ep_size=2))
    scenario("frozen", lambda out: frozen())
    scenario("s0_scattered", lambda out: scattered_zero0())
    scenario("tagged_s2", lambda out: tagged())
    scenario("layout_s1", lambda out: layout_stats())
    scenario("errors", lambda out: errors())
    scenario("resume_s1_fp32", lambda out: resume(ds_config(1, dist.get_world_size()), out, "resume_s1_fp32"))
    scenario("resume_s2_bf16", lambda out: resume(
        ds_config(2, dist.get_world_size(), bf16={"enabled": True}), out, "resume_s2_bf16"))


_register_defaults()

if __name__ == "__main__":
    main()
