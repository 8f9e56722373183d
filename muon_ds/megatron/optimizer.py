"""``get_megatron_optimizer`` for Moonlight's Muon: megatron-core's wrappers around muon_ds's :class:`Muon`.

megatron-core's wrappers do what they do for Adam (fp32 main params, loss scaling, grad clipping,
the distributed optimizer's reduce-scattered shards and parameter all-gather); the inner optimizer
is muon_ds's Muon, told through a :class:`~muon_ds.partition.GroupLayout` which pieces of which
logical matrices each of its tensors holds (a TP block, a distributed-optimizer shard range of
it). The exchange plan then gathers whole matrices to owners spread over the ranks of the
pipeline stage (data- and tensor-parallel together, balanced by Newton-Schulz FLOPs), and sends
each holder its piece of the update: TP=2 and DP=2 give the same weights as one rank.
How the wrappers save and load Muon's state is :mod:`muon_ds.megatron.checkpoint`'s business.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer import _get_param_groups_and_buffers
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from megatron.core.optimizer.optimizer import ChainedOptimizer, MegatronOptimizer
from megatron.core.optimizer.optimizer_config import OptimizerConfig, ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_model_config, get_pg_rank, get_pg_size, log_single_rank

import muon_ds
from muon_ds.matrices import MatrixView, assign
from muon_ds.megatron import finite
from muon_ds.megatron.arguments import MuonSettings
from muon_ds.megatron.checkpoint import MegatronMuon, MuonDistributedOptimizer, MuonFloat16Optimizer, MuonFP32Optimizer
from muon_ds.megatron.version import check_megatron_core, unsupported_settings
from muon_ds.megatron.views import Sharding, megatron_views
from muon_ds.partition import GroupLayout
from muon_ds.plan import Holding, Matrix, Piece, make_plan

logger = logging.getLogger(__name__)


def _exchange_group(pg: ProcessGroupCollection) -> dist.ProcessGroup:
    """All ranks of this pipeline stage: tensor-, context- and data-parallel (the expert layout spans the same)."""
    group = getattr(pg, "tp_dp_cp", None)
    if group is None:
        raise ValueError("muon_ds's Muon exchanges matrices over the tensor x data x context parallel group: "
                         "the pg_collection given to get_megatron_optimizer has no 'tp_dp_cp'")
    return group


def _sharding(name: str, param: torch.Tensor, model_config: Any, settings: MuonSettings,
              pg: ProcessGroupCollection) -> Sharding:
    expert = not getattr(param, "allreduce", True)
    tp = pg.expt_tp if expert else pg.tp
    offset = 0
    if expert and model_config.num_moe_experts:
        ep_size = get_pg_size(pg.ep)
        offset = get_pg_rank(pg.ep) * (model_config.num_moe_experts // ep_size)
    qkv = None
    if not getattr(model_config, "multi_latent_attention", False) and model_config.num_query_groups:
        heads_per_group = model_config.num_attention_heads // model_config.num_query_groups
        kv = model_config.kv_channels
        qkv = (heads_per_group * kv, kv, kv)
    return Sharding(tp_rank=get_pg_rank(tp), tp_size=get_pg_size(tp), expert_offset=offset,
                    tp_mode=settings.tp_mode, split_qkv=settings.split_qkv,
                    gated_linear_unit=bool(model_config.gated_linear_unit), qkv_split=qkv)


def describe_matrices(model_chunks: List[MegatronModule], settings: MuonSettings, pg: ProcessGroupCollection,
                      matrix_params: Optional[str] = None, adam_params: Optional[str] = None) -> None:
    """Tag every trainable parameter with its matrices (``muon_ds.matrices.assign``), or None for AdamW."""
    for chunk_index, chunk in enumerate(model_chunks):
        model_config = get_model_config(chunk)
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            if adam_params and re.search(adam_params, name):
                assign(param, None)
                continue
            views = megatron_views(name, param, _sharding(name, param, model_config, settings, pg))
            if matrix_params and re.search(matrix_params, name) and views is None:
                raise ValueError(f"parameter {name!r} of shape {tuple(param.shape)} matches the Muon pattern "
                                 f"{matrix_params!r} but is not a hidden matrix (Muon needs a 2-D weight that "
                                 "is not an embedding, output head or router)")
            if views is not None and len(model_chunks) > 1:
                views = tuple(MatrixView(f"chunk{chunk_index}.{v.key}", v.shape, v.offset, v.block) for v in views)
            assign(param, views)


def attach_layouts(inner: MegatronMuon, model_params: List[List[torch.nn.Parameter]],
                   ranges: Callable[[torch.nn.Parameter], tuple[int, int]], group: dist.ProcessGroup,
                   device: torch.device) -> None:
    """Give each Muon group of ``inner`` the pieces its tensors hold and the plan over ``group``.

    ``model_params[i][j]`` is the model parameter of the j-th tensor of group i; ``ranges`` gives the
    elements of it that tensor holds (a distributed-optimizer shard, or all of it). Every rank's
    holdings are exchanged once here, so the plan needs no assumption about other ranks' layouts.
    Groups are matched across ranks by position (megatron-core aligns param groups over all ranks).
    """
    rank = dist.get_rank(group)
    mine: dict[int, tuple[list, list]] = {}
    local: dict[int, list[list[tuple[Piece, int]]]] = {}
    for index, param_group in enumerate(inner.param_groups):
        if not param_group["use_muon"]:
            continue
        matrices, pieces, per_tensor = [], [], []
        for model_param in model_params[index]:
            start, stop = ranges(model_param)
            held = []
            for view in model_param.muon_ds_matrices:
                matrices.append((view.key, view.shape))
                lo, hi = max(start, view.offset), min(stop, view.offset + view.numel)
                if lo < hi:
                    piece = Piece(view.key, view.block, lo - view.offset, hi - view.offset)
                    pieces.append(piece)
                    held.append((piece, lo - start))
            per_tensor.append(held)
        mine[index] = (matrices, pieces)
        local[index] = per_tensor
    everyone: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(everyone, mine, group=group)
    for other_rank, theirs in enumerate(everyone):
        if set(theirs) != set(mine):
            raise RuntimeError(f"Muon param groups differ between ranks {rank} and {other_rank} of the same "
                               f"pipeline stage: groups {sorted(mine)} vs {sorted(theirs)}")
    for index, param_group in enumerate(inner.param_groups):
        if not param_group["use_muon"]:
            continue
        shapes: dict[str, tuple[int, int]] = {}
        holdings = []
        for other_rank, theirs in enumerate(everyone):
            matrices, pieces = theirs[index]
            for key, shape in matrices:
                if shapes.setdefault(key, shape) != shape:
                    raise ValueError(f"matrix {key!r} has shape {shape} on rank {other_rank}, "
                                     f"{shapes[key]} elsewhere")
            holdings += [Holding(other_rank, piece) for piece in pieces]
        plan = make_plan([Matrix(k, s) for k, s in shapes.items()], holdings, len(everyone), param_group["ns_steps"])
        inner.set_layout(param_group, GroupLayout(local[index], plan, rank, group, device))
    inner.sync_group = group


def _grad_scaler(config: OptimizerConfig) -> Optional[MegatronGradScaler]:
    """Megatron's choice: a constant loss scale if given, dynamic for fp16, none for bf16."""
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
                                 growth_factor=2.0, backoff_factor=0.5, growth_interval=config.loss_scale_window,
                                 hysteresis=config.hysteresis)
    return None


def _build(config: OptimizerConfig, settings: MuonSettings, model_chunks: List[MegatronModule],
           param_groups: List[Dict], buffers: Dict, pg: ProcessGroupCollection, groups: dict,
           expert: bool) -> MegatronOptimizer:
    """One chained member: MegatronMuon over ``param_groups``, wrapped as megatron-core would wrap Adam."""
    dp_group = groups["intra_expt_dp_group" if expert else "intra_dp_cp_group"]
    dp_gloo = groups["intra_expt_dp_group_gloo" if expert else "intra_dp_cp_group_gloo"]
    mp_group = groups["expt_tp_pp_group" if expert else "mp_group"]
    params = [p for g in param_groups for p in g["params"]]
    inner = None
    if params:
        mode, multiplier = settings.core_scale
        inner = MegatronMuon(param_groups, lr=config.lr, weight_decay=config.weight_decay, momentum=settings.momentum,
                             nesterov=settings.nesterov, ns_steps=settings.ns_steps,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, scale=mode,
                             ns_dtype=settings.ns_dtype, extra_scale=multiplier)
    model_params = [list(g["params"]) for g in inner.param_groups] if inner else []
    init_state = inner.init_state if inner else None
    if config.fp16 or config.bf16 or config.use_distributed_optimizer:
        scaler = _grad_scaler(config)
        if config.use_distributed_optimizer:
            instance = get_pg_rank(groups["inter_dist_opt_group"]) if groups.get("inter_dist_opt_group") else 0
            wrapped = MuonDistributedOptimizer(inner, config, scaler, init_state, model_chunks=model_chunks,
                                               per_model_buffers=buffers, data_parallel_group=dp_group,
                                               data_parallel_group_gloo=dp_gloo,
                                               data_parallel_group_idx=get_pg_rank(mp_group),
                                               distributed_optimizer_instance_id=instance)
            wrapped.grad_stats_parallel_group = groups["intra_dist_opt_group"]
        else:
            wrapped = MuonFloat16Optimizer(inner, config, scaler, init_state)
            wrapped.grad_stats_parallel_group = mp_group
    else:
        wrapped = MuonFP32Optimizer(inner, config, init_state)
        wrapped.grad_stats_parallel_group = mp_group
    wrapped.tp_group = pg.tp
    if inner is None:
        return wrapped
    if config.use_distributed_optimizer:
        model_params = [w32 + w16 for w32, w16 in zip(wrapped.model_fp32_groups, wrapped.model_float16_groups)]

        def ranges(param: torch.nn.Parameter) -> tuple[int, int]:
            shard = wrapped._get_model_param_range_map(param)["param"]
            return shard.start, shard.end
    else:
        def ranges(param: torch.nn.Parameter) -> tuple[int, int]:
            return 0, param.numel()
    attach_layouts(inner, model_params, ranges, _exchange_group(pg), params[0].device)
    inner.init_state()
    return wrapped


def _refuse_unsupported(config: OptimizerConfig, model_chunks: List[MegatronModule],
                        dump_param_to_param_group_map: Optional[str]) -> None:
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    problems = {
        "use_megatron_fsdp": bool(ddp_config is not None and ddp_config.use_megatron_fsdp),
        "optimizer_cpu_offload": config.optimizer_cpu_offload,
        "use_precision_aware_optimizer": config.use_precision_aware_optimizer,
        "overlap_param_gather_with_optimizer_step": config.overlap_param_gather_with_optimizer_step,
        "decoupled_weight_decay=False": not config.decoupled_weight_decay,
        "dump_param_to_param_group_map": dump_param_to_param_group_map is not None,
        **unsupported_settings(config),
    }
    bad = [name for name, on in problems.items() if on]
    if bad:
        raise ValueError(f"muon_ds's Muon does not support {', '.join(bad)}; remove that setting")


def get_megatron_optimizer(
    config: OptimizerConfig,
    model_chunks: List[MegatronModule],
    config_overrides: Optional[Dict[ParamKey, ParamGroupOverride]] = None,
    use_gloo_process_groups: bool = True,
    pg_collection: Optional[ProcessGroupCollection] = None,
    dump_param_to_param_group_map: Optional[str] = None,
    *,
    matrix_params: Optional[str] = None,
    adam_params: Optional[str] = None,
) -> MegatronOptimizer:
    """megatron-core's ``get_megatron_optimizer`` with Moonlight's Muon: Muon on hidden matrices, AdamW on the rest.

    Takes the ``muon_*`` fields of ``config`` (Megatron's names; :func:`~muon_ds.megatron.arguments.
    moonlight_optimizer_config` gives Moonlight's; settings that are not, e.g. megatron-core's
    dataclass defaults, are warned about loudly at start-up), AdamW's betas/eps/lr/weight decay,
    and returns a ChainedOptimizer (dense, then expert parameters) that Megatron's training loop,
    scheduler, grad clipping, loss scaling and dist_checkpointing use as they use Adam's.
    ``matrix_params`` / ``adam_params`` (regexes on parameter names) force Muon (an error if it is
    not a matrix) or AdamW.
    """
    check_megatron_core()
    settings = MuonSettings.from_config(config)
    _refuse_unsupported(config, model_chunks, dump_param_to_param_group_map)
    pg = pg_collection if pg_collection is not None else ProcessGroupCollection.use_mpu_process_groups()
    tp_size = max(get_pg_size(pg.tp), get_pg_size(getattr(pg, "expt_tp", None)))
    for problem in settings.off_moonlight(tp_size):
        log_single_rank(logger, logging.WARNING, f"muon_ds WARNING: not Moonlight's Muon: {problem}. "
                        "From Python, start from muon_ds.megatron.moonlight_optimizer_config(...)")
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(pg_collection, model_chunks,
                                                                       use_gloo_process_groups)
    describe_matrices(model_chunks, settings, pg, matrix_params, adam_params)
    optimizers = []
    for expert, buffer_name in ((False, "buffers"), (True, "expert_parallel_buffers")):
        param_groups, buffers = _get_param_groups_and_buffers(
            model_chunks, model_chunk_offset=0, config=config, config_overrides=config_overrides,
            filter_fn=(lambda g: g["is_expert_parallel"]) if expert else (lambda g: not g["is_expert_parallel"]),
            buffer_name=buffer_name)
        if expert and not param_groups:
            continue
        optimizers.append(_build(config, settings, model_chunks, param_groups, buffers, pg, groups, expert))
    finite.install(optimizers)
    chained = ChainedOptimizer(optimizers)
    muon = sum(len(o.optimizer.views[p]) for o in optimizers if o.optimizer is not None
               for p in o.optimizer.views)
    adamw = sum(len(g["params"]) for o in optimizers if o.optimizer is not None
                for g in o.optimizer.param_groups if not g["use_muon"])
    log_single_rank(logger, logging.INFO,
                    f"muon_ds {muon_ds.__version__}: Moonlight Muon under megatron-core "
                    f"[{type(optimizers[0]).__name__}]: {settings.describe()}; on this rank {muon} matrix "
                    f"blocks -> Muon, {adamw} tensors -> AdamW")
    return chained
