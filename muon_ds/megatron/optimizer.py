"""``get_megatron_optimizer`` for Moonlight's Muon: megatron-core's wrappers around muon_ds's :class:`Muon`.

megatron-core's wrappers do what they do for Adam (fp32 main params, loss scaling, grad clipping,
the distributed optimizer's reduce-scattered shards and parameter all-gather); the inner optimizer
is muon_ds's Muon, told through a :class:`~muon_ds.partition.GroupLayout` which pieces of which
logical matrices each of its tensors holds (a TP block, a distributed-optimizer shard range of
it). The exchange plan then gathers whole matrices to owners spread over the ranks of the
pipeline stage (data- and tensor-parallel together, balanced by Newton-Schulz FLOPs), and sends
each holder its piece of the update: TP=2 and DP=2 give the same weights as one rank.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer import _get_param_groups_and_buffers
from megatron.core.optimizer import distrib_optimizer as megatron_distrib_optimizer
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from megatron.core.optimizer.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
)
from megatron.core.optimizer.optimizer_config import OptimizerConfig, ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_model_config, get_pg_rank, get_pg_size, log_single_rank

import muon_ds
from muon_ds.exchange import gather_owned, scatter_updates
from muon_ds.matrices import Block, MatrixView, assign
from muon_ds.megatron.arguments import MuonSettings
from muon_ds.megatron.version import check_megatron_core
from muon_ds.megatron.views import Sharding, megatron_views
from muon_ds.optim import Muon
from muon_ds.partition import GroupLayout
from muon_ds.plan import ExchangePlan, Holding, Matrix, Piece, make_plan

logger = logging.getLogger(__name__)


class MegatronMuon(Muon):
    """muon_ds's Muon with the state layout megatron-core's checkpointing expects.

    Every tensor carries a ``step`` (Megatron saves one step shared by all tensors), state exists
    from construction on (so every rank saves the same keys, even for a matrix that got no
    gradient), and each group counts its steps for TransformerEngine-style checkpoints.
    """

    ENGINE_GROUP_KEYS = None  # megatron-core builds the groups: keys besides Muon's options are its own

    def init_state(self, *_args: Any) -> None:
        """Create every tensor's state now (megatron-core's ``init_state_fn`` signature)."""
        for group in self.param_groups:
            group.setdefault("step", 0)
            for p in group["params"]:
                state = self.state[p]
                if state:
                    continue
                state["step"] = torch.tensor(float(group["step"]))
                if group["use_muon"]:
                    state["momentum_buffer"] = torch.zeros_like(p)
                else:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)

    def _muon_step(self, group: dict[str, Any]) -> None:
        super()._muon_step(group)
        for p in group["params"]:
            self.state[p]["step"] += 1
        group["step"] = group.get("step", 0) + 1

    def _adamw_step(self, group: dict[str, Any]) -> None:
        super()._adamw_step(group)
        group["step"] = group.get("step", 0) + 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then take each tensor's step from its group where the checkpoint kept only that."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if "step" in group:
                for p in group["params"]:
                    if "step" in self.state[p]:
                        self.state[p]["step"] = torch.tensor(float(group["step"]))


@contextlib.contextmanager
def _groups_told_apart() -> Iterator[None]:
    """megatron-core matches saved and current param groups by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr); a Muon group and the AdamW group split from the same Megatron group share those,
    so while loading they are also told apart by ``use_muon``."""
    keys = megatron_optimizer.param_group_identifier_keys
    extended = tuple(keys) + ("use_muon",)
    megatron_optimizer.param_group_identifier_keys = extended
    megatron_distrib_optimizer.param_group_identifier_keys = extended
    try:
        yield
    finally:
        megatron_optimizer.param_group_identifier_keys = keys
        megatron_distrib_optimizer.param_group_identifier_keys = keys


class MuonFP32Optimizer(FP32Optimizer):
    """FP32Optimizer around :class:`MegatronMuon`."""

    def load_state_dict(self, state_dict: dict) -> None:
        with _groups_told_apart():
            super().load_state_dict(state_dict)


class MuonFloat16Optimizer(Float16OptimizerWithFloat16Params):
    """bf16/fp16 model params, fp32 main params, around :class:`MegatronMuon`."""

    def load_state_dict(self, state_dict: dict) -> None:
        with _groups_told_apart():
            super().load_state_dict(state_dict)


class MuonDistributedOptimizer(DistributedOptimizer):
    """megatron-core's distributed optimizer (ZeRO-1) around :class:`MegatronMuon`.

    Checkpoints hold the optimizer state in model space: per parameter and state key one tensor of
    the parameter's (TP-local) shape, described by the model's own sharded metadata, so they reload
    at another DP (and TP) size. megatron-core's own formats cannot carry it: they assume Adam's
    keys for every tensor, and its flattened model-space format is refused by dist_checkpointing.
    Each parameter's state is assembled on one DP rank (owners balanced by size, with the same
    plan and exchange as Newton-Schulz), so no rank holds more than about its share of the state.
    """

    CHECKPOINT_FORMAT = "muon_ds_model_space"

    def __init__(self, optimizer: Optional[MegatronMuon], *args: Any, **kwargs: Any) -> None:
        # The constructor accepts only Adam "due to checkpointing requirements", which this class
        # meets itself (sharded_state_dict below); let our inner optimizer through that one check.
        adam = megatron_distrib_optimizer.Adam
        megatron_distrib_optimizer.Adam = (adam, MegatronMuon)
        try:
            super().__init__(optimizer, *args, **kwargs)
        finally:
            megatron_distrib_optimizer.Adam = adam

    @staticmethod
    def _state_keys(model_param: torch.nn.Parameter) -> tuple[str, ...]:
        if getattr(model_param, "muon_ds_matrices", None) is not None:
            return ("param", "momentum_buffer")
        return ("param", "exp_avg", "exp_avg_sq")

    def _checkpoint_plans(self, gbuf_idx: int) -> list[tuple[tuple[str, ...], ExchangePlan, dict]]:
        """Per kind of state (Muon's or AdamW's keys): which DP rank holds which elements of each
        parameter of this buffer (Megatron's shard arithmetic, for every rank), and the owners."""
        buffer = self.buffers[gbuf_idx]
        world, rank = self.data_parallel_group.size(), self.data_parallel_group.rank()
        ranks_ranges = []
        for bucket in buffer.buckets:
            size = bucket.grad_data.numel() // world
            for r in range(world):
                shard = Range(bucket.offset + r * size, bucket.offset + (r + 1) * size)
                params = {p: buffer.param_index_map[p] for p in bucket.params}
                ranks_ranges.append((r, self._build_model_gbuf_param_range_map(params, shard, bucket.offset)))
        kinds: dict[tuple[str, ...], tuple[list, list, dict]] = {}
        for index, model_param in enumerate(buffer.param_index_map):
            matrices, holdings, mine = kinds.setdefault(self._state_keys(model_param), ([], [], {}))
            key = str(index)
            matrices.append(Matrix(key, (1, model_param.numel())))
            for r, ranges in ranks_ranges:
                if model_param in ranges:
                    shard = ranges[model_param]["param"]
                    piece = Piece(key, Block.whole((1, model_param.numel())), shard.start, shard.end)
                    holdings.append(Holding(r, piece))
                    if r == rank:
                        mine[model_param] = (index, piece)
        # ns_steps=1 FLOPs of a 1 x n "matrix" grow with n: owners balanced by state size
        return [(keys, make_plan(matrices, holdings, world, ns_steps=1), mine)
                for keys, (matrices, holdings, mine) in kinds.items()]

    def _main_and_state(self, model_param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        return {"param": main_param, **self.optimizer.state[main_param]}

    def sharded_state_dict(self, model_sharded_state_dict: Any, is_loading: bool = False,
                           sharding_type: Optional[str] = None, metadata: Optional[dict] = None) -> dict:
        """Step, param groups and loss scale as common state; tensors in model space (see the class doc)."""
        requested = sharding_type or (metadata or {}).get("distrib_optim_sharding_type")
        if requested not in (None, self.CHECKPOINT_FORMAT):
            log_single_rank(logger, logging.INFO, f"muon_ds: the Muon distributed optimizer saves its state as "
                            f"{self.CHECKPOINT_FORMAT!r}, not {requested!r} (Muon and AdamW keep different state)")
        state_dict = self.state_dict()
        if self.is_stub_optimizer:
            return state_dict
        tensors, _ = extract_sharded_tensors_and_factories(model_sharded_state_dict)
        described = {sharded.data: sharded for sharded in nested_values(tensors)}
        rank, group = self.data_parallel_group.rank(), self.data_parallel_group
        param_state: dict[str, dict[str, Any]] = {}
        for gbuf_idx, buffer in enumerate(self.buffers):
            params = list(buffer.param_index_map)
            device = params[0].device
            for keys, plan, mine in self._checkpoint_plans(gbuf_idx):
                owned = [int(m.key) for m in plan.owned(rank)]
                for key in keys:
                    if is_loading:
                        full = {str(i): torch.empty(params[i].numel(), dtype=torch.float32, device=device)
                                for i in owned}
                    else:
                        local = {piece: self._main_and_state(p)[key].detach().reshape(-1)
                                 for p, (_index, piece) in mine.items()}
                        full = gather_owned(plan, rank, local, group, torch.float32, device)
                    for i in owned:
                        model_param = params[i]
                        if model_param not in described:
                            raise KeyError(f"parameter {self._param_name(model_param)!r} is missing from the "
                                           "model's sharded state dict (build it with keep_vars=True)")
                        sharded = described[model_param]
                        data = full[str(i)].view(model_param.shape)
                        name = "fp32_param" if key == "param" else key
                        # this rank holds the one copy saved for the DP group
                        replica = (*sharded.replica_id[:2], self.distributed_optimizer_instance_id)
                        changes = dict(key=f"optimizer.state.{name}.{sharded.key}", data=data, dtype=data.dtype,
                                       replica_id=replica)
                        if isinstance(sharded, ShardedTensorFactory):
                            changes.pop("dtype")
                        param_state.setdefault(f"{gbuf_idx}.{i}", {})[key] = replace(sharded, **changes)
        state_dict["param_state"] = param_state
        state_dict["param_state_sharding_type"] = self.CHECKPOINT_FORMAT
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Param groups and step through megatron-core, then the owners send every rank its shard of the state."""
        param_state = state_dict.pop("param_state", None)
        kind = state_dict.pop("param_state_sharding_type", self.CHECKPOINT_FORMAT)
        with _groups_told_apart():
            super().load_state_dict(state_dict)
        if param_state is None:
            return
        if kind != self.CHECKPOINT_FORMAT:
            raise ValueError(f"this checkpoint's distributed optimizer state is {kind!r}, written by another "
                             f"optimizer; muon_ds's Muon reads {self.CHECKPOINT_FORMAT!r}")
        rank, group = self.data_parallel_group.rank(), self.data_parallel_group
        for gbuf_idx, buffer in enumerate(self.buffers):
            params = list(buffer.param_index_map)
            device = params[0].device
            for keys, plan, mine in self._checkpoint_plans(gbuf_idx):
                owned = [m.key for m in plan.owned(rank)]
                for key in keys:
                    loaded = {}
                    for i in owned:
                        entry = param_state.get(f"{gbuf_idx}.{i}", {})
                        if key not in entry:
                            raise KeyError(f"checkpoint has no optimizer state {key!r} for parameter "
                                           f"{self._param_name(params[int(i)])!r} (saved by another optimizer?)")
                        loaded[i] = entry[key].reshape(1, -1).to(device, torch.float32)
                    pieces = scatter_updates(plan, rank, loaded, [piece for _i, piece in mine.values()], group,
                                             torch.float32, device)
                    with torch.no_grad():
                        for model_param, (_index, piece) in mine.items():
                            self._main_and_state(model_param)[key].copy_(pieces[piece])


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

    Takes the ``muon_*`` fields of ``config`` (Megatron's names), AdamW's betas/eps/lr/weight decay,
    and returns a ChainedOptimizer (dense, then expert parameters) that Megatron's training loop,
    scheduler, grad clipping, loss scaling and dist_checkpointing use as they use Adam's.
    ``matrix_params`` / ``adam_params`` (regexes on parameter names) force Muon (an error if it is
    not a matrix) or AdamW.
    """
    check_megatron_core()
    settings = MuonSettings.from_config(config)
    _refuse_unsupported(config, model_chunks, dump_param_to_param_group_map)
    pg = pg_collection if pg_collection is not None else ProcessGroupCollection.use_mpu_process_groups()
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
