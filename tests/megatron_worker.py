"""One rank of the Megatron Muon tests: train a tiny Moonlight (MLA, sigmoid-routed experts with expert bias,
shared experts, first layer dense) with muon_ds's ``get_megatron_optimizer`` under Megatron DDP on CPU/gloo.

``python -m tests.megatron_worker OUT SCENARIO [SCENARIO ...]`` (under tests.distributed.run_ranks).
Each scenario is ``name:key=value,...`` with the keys of ``DEFAULTS`` (parallel sizes, Muon TP mode,
distributed optimizer, precision, clipping, overlap, checkpoint save/load, a reference run of
muon_ds's single-process Muon, a fp16 overflow step, ``arch=gpt`` for megatron-core's plain GPT);
all scenarios of one launch run in the same processes (megatron-core's import dominates the time),
each from the same full initial weights, and write ``OUT/<name>.rank<r>.pt``: this rank's final
weights gathered over tensor parallelism, keyed by global parameter name (experts and layers
numbered globally).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from muon_ds.glu_layout import shard_glu, unshard_glu
from tests import megatron_cpu, megatron_cpu_optim

TINY = json.loads((Path(__file__).parent / "data" / "moonlight-tiny.config.json").read_text())
BATCH, SEQ, LR, WD = 4, 16, 0.02, 0.1
DEFAULTS = dict(tp=1, ep=1, mode="distributed", distopt=1, steps=3, save="", load="", reference=0, clip=0.0,
                bucket=0, overlap=0, precision="fp32", poison=-1, reshardable=0, pp=1, arch="moonlight", native=0,
                format="torch_dist", config="moonlight")


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = spec.partition(":")
    options = dict(DEFAULTS)
    for item in filter(None, rest.split(",")):
        key, value = item.split("=", 1)
        options[key] = type(DEFAULTS[key])(value) if not isinstance(DEFAULTS[key], str) else value
    return name, options


def _tp_group(param: torch.Tensor) -> dist.ProcessGroup:
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_group() if not getattr(param, "allreduce", True) else \
        ps.get_tensor_model_parallel_group()


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight")


def _global(name: str, model: Any) -> str:
    """Experts numbered over EP ranks, layers over pipeline stages: the same name in every layout."""
    from megatron.core import parallel_state as ps

    from muon_ds.megatron.views import global_name

    local = (model.config.num_moe_experts or 0) // ps.get_expert_model_parallel_world_size()
    layers = model.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
    return global_name(name, ps.get_expert_model_parallel_rank() * local)


def _split(name: str, param: torch.Tensor, full: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """This TP rank's shard of a full tensor, as Megatron lays it out (gate/up halves each sharded)."""
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if _is_gated_fc1(name):
        return shard_glu(*full.chunk(2, dim=0), size, rank)
    return full.chunk(size, dim=param.partition_dim)[rank]


def _gather(name: str, param: torch.Tensor) -> torch.Tensor:
    """The full tensor from the TP shards (inverse of _split)."""
    group = _tp_group(param)
    size = dist.get_world_size(group)
    data = param.detach().float()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return data.clone()
    parts = [torch.empty_like(data) for _ in range(size)]
    dist.all_gather(parts, data.contiguous(), group=group)
    if _is_gated_fc1(name):
        return torch.cat(unshard_glu(parts))
    return torch.cat(parts, dim=param.partition_dim)


def init_weights(model: torch.nn.Module) -> None:
    """Full weights drawn per global name, so every parallel layout starts from the same model."""
    for name, param in model.named_parameters():
        group = _tp_group(param)
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        shape = list(param.shape)
        if size > 1 and getattr(param, "tensor_model_parallel", False):
            shape[param.partition_dim] *= size
        generator = torch.Generator().manual_seed(zlib.crc32(_global(name, model).encode()))
        full = torch.randn(shape, generator=generator)
        full = 1 + 0.1 * full if param.dim() == 1 else 0.08 * full
        with torch.no_grad():
            param.copy_(_split(name, param, full, size, rank))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_global(name, model): _gather(name, p) for name, p in model.named_parameters()}


def _gpt(common: dict[str, Any]) -> tuple[Any, Any]:
    """megatron-core's own local GPT layers: 4 heads in 2 query groups, SwiGLU, RMSNorm, RoPE."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=96, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                               bias_activation_fusion=False, add_bias_linear=False, normalization="RMSNorm",
                               hidden_dropout=0.0, attention_dropout=0.0, **common)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=TINY["vocab_size"],
                     max_sequence_length=64, position_embedding_type="rope", share_embeddings_and_output_weights=False)
    return config, model


def build(options: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Model (wrapped in Megatron DDP) and optimizer for one scenario."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from muon_ds.megatron import get_megatron_optimizer, moonlight_optimizer_config
    from muon_ds.models.config import mla_transformer_config
    from muon_ds.models.spec import build_moonlight_model

    megatron_cpu.reinit_parallel(tp=options["tp"], ep=options["ep"], pp=options["pp"])
    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # class state the previous scenario left behind
    pipeline = {}
    if options["pp"] > 1:  # 3 layers: the dense one on the first stage, the two MoE layers on the last
        pipeline = dict(pipeline_model_parallel_size=options["pp"], pipeline_dtype=torch.float32,
                        num_layers_in_first_pipeline_stage=1)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options["precision"])
    common = dict(tensor_model_parallel_size=options["tp"], sequence_parallel=options["tp"] > 1,
                  params_dtype=half or torch.float32, use_cpu_initialization=True, bf16=half is torch.bfloat16,
                  fp16=half is torch.float16, perform_initialization=True)  # (this also sets the TP attributes)
    if options["arch"] == "gpt":  # plain GPT with grouped-query attention: fused q/k/v per query group
        config, model = _gpt(dict(common, sequence_parallel=False))  # torch norms refuse sequence parallel
    else:
        config = mla_transformer_config(TINY, expert_model_parallel_size=options["ep"], **common, **pipeline)
        model = build_moonlight_model(config, TINY["vocab_size"], TINY["max_position_embeddings"],
                                      pre_process=ps.is_pipeline_first_stage(),
                                      post_process=ps.is_pipeline_last_stage())
    init_weights(model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=bool(options["distopt"]),
                                               bucket_size=options["bucket"] or None,
                                               overlap_grad_reduce=bool(options["overlap"]),
                                               overlap_param_gather=bool(options["overlap"]))
    ddp = DistributedDataParallel(config, ddp_config, model)
    common = dict(lr=LR, min_lr=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.95, clip_grad=options["clip"],
                  use_distributed_optimizer=bool(options["distopt"]), bf16=half is torch.bfloat16,
                  fp16=half is torch.float16, initial_loss_scale=2.0**10)
    if options["config"] == "megatron":  # megatron-core's own dataclass defaults for muon_*
        opt_config = OptimizerConfig(optimizer="muon", **common)
    else:  # the Python route to Moonlight's settings (NS in float32 for the comparisons)
        opt_config = moonlight_optimizer_config(muon_fp32_matmul_prec="high", muon_tp_mode=options["mode"], **common)
    if options["native"]:  # megatron-core 0.19's own Muon, given the same (Moonlight's) settings
        from megatron.core.optimizer import get_megatron_optimizer as native_factory

        optimizer = native_factory(opt_config, [ddp])
    else:
        optimizer = get_megatron_optimizer(opt_config, [ddp])
        for member in (o.optimizer for o in optimizer.chained_optimizers if o.optimizer is not None):
            _count_agreements(member)
    return ddp, optimizer, config


def _count_agreements(muon: Any) -> None:
    """Count the finite-gradient agreements muon_ds's Muon makes."""
    agreed = muon._agreed
    muon.agreements = 0

    def counted(finite: torch.Tensor) -> bool:
        muon.agreements += 1
        return agreed(finite)

    muon._agreed = counted


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This DP rank's rows of the global batch of ``step``."""
    from megatron.core import parallel_state as ps

    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, TINY["vocab_size"], (BATCH, SEQ + 1), generator=generator)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = tokens.chunk(dp)[rank]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def _forward_step(data: Any, model: Any) -> tuple[torch.Tensor, Any]:
    tokens, labels = next(data)
    output = model(input_ids=tokens, position_ids=torch.arange(SEQ).expand_as(tokens), attention_mask=None,
                   labels=labels)
    return output, lambda losses: (losses.float().mean(), {})


def train_step(ddp: Any, optimizer: Any, step: int, poison: bool = False) -> bool:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    tokens, labels = batch(step)
    if ddp.config.pipeline_model_parallel_size > 1:  # Megatron's 1F1B schedule, one micro-batch
        ddp.config.grad_scale_func = optimizer.scale_loss
        get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter([(tokens, labels)]),
                                    model=[ddp], num_microbatches=1, seq_length=SEQ,
                                    micro_batch_size=tokens.shape[0])
    else:
        losses = ddp(input_ids=tokens, position_ids=torch.arange(SEQ).expand_as(tokens), attention_mask=None,
                     labels=labels)
        (losses.float().mean() * optimizer.get_loss_scale()).backward()  # 1 unless fp16 loss scaling
    finalize_model_grads([ddp])
    if poison:  # an overflow on one rank: every rank must skip the step and keep its state
        for param in ddp.module.parameters():
            param.main_grad.fill_(float("inf"))
    return optimizer.step()[0]


def _qkv_order(config: Any) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Rows of Megatron's fused q/k/v ([q heads; k; v] per query group) reordered as [all q; all k; all v]."""
    groups, channels = config.num_query_groups, config.kv_channels
    parts = [("q", config.num_attention_heads // groups * channels), ("k", channels), ("v", channels)]
    per_group = sum(size for _, size in parts)
    order, start = [], 0
    for _part, size in parts:
        order += [g * per_group + start + i for g in range(groups) for i in range(size)]
        start += size
    return torch.tensor(order), [(part, size * groups) for part, size in parts]


class Reference:
    """muon_ds's single-process Muon on a copy of the TP=1 model, fed Megatron's gradients, with Moonlight's split."""

    def __init__(self, model: torch.nn.Module, split_gate_up: bool = True) -> None:
        from muon_ds.matrices import MatrixView, assign, by_dimensions, split_rows
        from muon_ds.optim import Muon

        config = model.config
        self.pairs = []
        named = []
        for name, param in model.named_parameters():
            rows = slice(None)
            if name.endswith("linear_qkv.weight"):  # the reference holds q, k and v as stacked whole matrices
                rows, parts = _qkv_order(config)
            copy = param.detach()[rows].clone()
            if "embedding" in name or "output_layer" in name or "router" in name or param.dim() != 2:
                assign(copy, None)
            elif name.endswith("linear_fc1.weight") and split_gate_up:
                assign(copy, split_rows(2)(name, copy.shape))
            elif name.endswith("linear_qkv.weight"):
                offsets = torch.tensor([0] + [size for _, size in parts]).cumsum(0).tolist()
                assign(copy, [MatrixView.whole(f"{name}.{part}", (size, copy.shape[1]), start * copy.shape[1])
                              for (part, size), start in zip(parts, offsets)])
            else:
                assign(copy, by_dimensions(name, copy.shape))
            self.pairs.append((param, copy, rows))
            named.append((name, copy))
        self.optimizer = Muon(named, lr=LR, weight_decay=WD, momentum=0.95, nesterov=True, ns_steps=5,
                              betas=(0.9, 0.95), eps=1e-8, scale="moonlight", ns_dtype="float32")

    def step(self) -> None:
        for param, copy, rows in self.pairs:
            copy.grad = param.main_grad.detach()[rows].clone()
        self.optimizer.step()

    def error(self) -> float:
        return max(((p.detach()[rows] - c).abs().max() / c.abs().max().clamp_min(1e-12)).item()
                   for p, c, rows in self.pairs)


def _optimizer_state(optimizer: Any) -> list[torch.Tensor]:
    """Copies of every main parameter and state tensor (to check that a skipped step changed nothing)."""
    out = []
    for member in optimizer.chained_optimizers:
        for group in member.optimizer.param_groups:
            for p in group["params"]:
                out.append(p.detach().clone())
                out += [v.detach().clone() for v in member.optimizer.state[p].values()]
    return out


def checkpoint_metadata(fully_reshardable: bool) -> dict[str, Any]:
    """What Megatron-LM's training passes (_build_sharded_state_dict_metadata), with or without
    --dist-ckpt-optim-fully-reshardable."""
    return {"distrib_optim_sharding_type": "fully_reshardable" if fully_reshardable else "dp_reshardable",
            "singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def _torch_format_files(directory: str) -> tuple[Path, Path]:
    """Megatron-LM's ``--ckpt-format torch`` files of this rank: its model/optimizer file (one per rank
    here; Megatron-LM writes it on expert-DP rank 0) and the distributed optimizer's ``distrib_optim.pt``
    of its (TP, PP, EP) ranks, written by DP rank 0."""
    from megatron.core import parallel_state as ps

    mp = Path(directory) / (f"mp_rank_{ps.get_tensor_model_parallel_rank():02d}_"
                            f"{ps.get_pipeline_model_parallel_rank():03d}_{ps.get_expert_model_parallel_rank():03d}")
    return mp / f"model_optim_rng.rank{dist.get_rank()}.pt", mp / "distrib_optim.pt"


def save_checkpoint(ddp: Any, optimizer: Any, directory: str, options: dict[str, Any]) -> None:
    """As Megatron-LM's save_checkpoint does it for ``--ckpt-format`` torch_dist or torch."""
    from megatron.core import dist_checkpointing

    if options["format"] == "torch":
        model_file, optim_file = _torch_format_files(directory)
        model_file.parent.mkdir(parents=True, exist_ok=True)
        if options["distopt"]:
            optimizer.save_parameter_state(str(optim_file))
        torch.save({"model": ddp.module.state_dict_for_save_checkpoint(), "optimizer": optimizer.state_dict()},
                   model_file)
        return
    metadata = checkpoint_metadata(bool(options["reshardable"]))
    model_state = ddp.module.sharded_state_dict(metadata=metadata)
    state = {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, metadata=metadata)}
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state, directory)


def load_checkpoint(ddp: Any, optimizer: Any, directory: str, options: dict[str, Any]) -> None:
    """As Megatron-LM's load_checkpoint does it for ``--ckpt-format`` torch_dist or torch."""
    from megatron.core import dist_checkpointing

    if options["format"] == "torch":
        model_file, optim_file = _torch_format_files(directory)
        state = torch.load(model_file, weights_only=False)
        ddp.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if options["distopt"]:
            optimizer.load_parameter_state(str(optim_file))
        return
    metadata = checkpoint_metadata(bool(options["reshardable"]))
    model_state = ddp.module.sharded_state_dict(metadata=metadata)
    state = {"model": model_state,
             "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)}
    loaded = dist_checkpointing.load(state, directory)
    ddp.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


class _Warnings(logging.Handler):
    """The warnings muon_ds logs while building the optimizer."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(name: str, options: dict[str, Any], out: Path) -> None:
    warned = _Warnings()
    logging.getLogger("muon_ds").addHandler(warned)
    try:
        ddp, optimizer, _config = build(options)
    except (ValueError, RuntimeError, AssertionError, ImportError) as err:
        if not options["native"]:
            raise
        torch.save({"error": f"{type(err).__name__}: {err}".splitlines()[0]}, out / f"{name}.rank{dist.get_rank()}.pt")
        return  # what megatron-core's own Muon refuses (benchmarks/megatron_native_muon.py)
    finally:
        logging.getLogger("muon_ds").removeHandler(warned)
    # reference=1: Moonlight's split; reference=2: fused gate/up (a positive control the check must catch)
    reference = Reference(ddp.module, options["reference"] == 1) if options["reference"] else None
    initial = weights(ddp.module)
    first = 0
    if options["load"]:
        load_checkpoint(ddp, optimizer, str(out / options["load"]), options)
        first = int(json.loads((out / options["load"] / "muon_test_step.json").read_text()))
    errors = []
    skipped_intact = None
    started = None  # timed from the second step on: the first pays one-off set-up
    for step in range(first, options["steps"]):
        if step == first + 1:
            started = time.perf_counter()
        if step == options["poison"]:
            before = _optimizer_state(optimizer)
            ok = train_step(ddp, optimizer, step, poison=dist.get_rank() == 0)
            after = _optimizer_state(optimizer)
            skipped_intact = not ok and all(torch.equal(a, b) for a, b in zip(before, after))
            continue
        train_step(ddp, optimizer, step)
        if reference is not None:
            reference.step()
            errors.append(reference.error())
        if options["save"] and step + 1 == int(options["save"].split("@")[1]):
            directory = out / options["save"].split("@")[0]
            save_checkpoint(ddp, optimizer, str(directory), options)
            if dist.get_rank() == 0:
                (directory / "muon_test_step.json").write_text(json.dumps(step + 1))
    if options["overlap"]:
        ddp.start_param_sync(force_sync=True)  # the last step's parameters are gathered lazily otherwise
    seconds_per_step = (time.perf_counter() - started) / (options["steps"] - first - 1) if started else None
    result = {"weights": weights(ddp.module), "initial": initial, "reference_errors": errors,
              "warnings": warned.messages, "seconds_per_step": seconds_per_step,
              "skipped_intact": skipped_intact, "loss_scale": float(optimizer.get_loss_scale())}
    if not options["native"]:
        members = [o.optimizer for o in optimizer.chained_optimizers if o.optimizer is not None]
        layouts = [layout for member in members for layout in member.layouts.values()]
        result.update(agreements=sum(member.agreements for member in members), members=len(members), gathers=sum(len(layout.plan.gathers) for layout in layouts),
                      ns_flops=[sum(layout.plan.flops[r] for layout in layouts) for r in range(layouts[0].plan.world_size)])
    torch.save(result, out / f"{name}.rank{dist.get_rank()}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    megatron_cpu_optim.apply()
    megatron_cpu.init_process(rank, world, int(os.environ["MASTER_PORT"]))
    try:
        for spec in sys.argv[2:]:
            name, options = parse(spec)
            run(name, options, out)
            dist.barrier()
    finally:
        megatron_cpu.shutdown()


if __name__ == "__main__":
    main()
