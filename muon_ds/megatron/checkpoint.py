"""How Muon's optimizer state goes through megatron-core's checkpoint formats.

megatron-core's optimizer wrappers save what Adam keeps (``exp_avg``, ``exp_avg_sq`` for every
tensor); Muon keeps a ``momentum_buffer`` for each hidden matrix and Adam's moments for the rest.
The wrappers here carry both kinds of state through each format Megatron-LM writes:

- ``--ckpt-format torch_dist`` (dist_checkpointing): the distributed optimizer's state in model
  space, one tensor per parameter and state key described by the model's own sharded metadata, so
  it reloads at another DP or TP size (:meth:`MuonDistributedOptimizer.sharded_state_dict`);
- ``--ckpt-format torch`` with the distributed optimizer: the per-(TP, PP, EP)-rank file
  ``distrib_optim.pt`` that DP rank 0 writes, in megatron-core's buffer layout with Muon's keys
  (:meth:`MuonDistributedOptimizer.get_parameter_state_dp_zero`);
- without the distributed optimizer: the plain ``state_dict`` of the inner optimizer.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer import distrib_optimizer as megatron_distrib_optimizer
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer
from megatron.core.utils import log_single_rank

from muon_ds.exchange import gather_owned, scatter_updates
from muon_ds.matrices import Block
from muon_ds.megatron.finite import ChecksFiniteGradients
from muon_ds.optim import Muon
from muon_ds.plan import ExchangePlan, Holding, Matrix, Piece, make_plan

logger = logging.getLogger(__name__)

MUON_STATE_KEYS = ("param", "momentum_buffer")
ADAMW_STATE_KEYS = ("param", "exp_avg", "exp_avg_sq")


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


class MuonFP32Optimizer(ChecksFiniteGradients, FP32Optimizer):
    """FP32Optimizer around :class:`MegatronMuon`."""

    def load_state_dict(self, state_dict: dict) -> None:
        with _groups_told_apart():
            super().load_state_dict(state_dict)


class MuonFloat16Optimizer(ChecksFiniteGradients, Float16OptimizerWithFloat16Params):
    """bf16/fp16 model params, fp32 main params, around :class:`MegatronMuon`."""

    def load_state_dict(self, state_dict: dict) -> None:
        with _groups_told_apart():
            super().load_state_dict(state_dict)


class MuonDistributedOptimizer(ChecksFiniteGradients, DistributedOptimizer):
    """megatron-core's distributed optimizer (ZeRO-1) around :class:`MegatronMuon`.

    dist_checkpointing holds the optimizer state in model space: per parameter and state key one
    tensor of the parameter's (TP-local) shape, described by the model's own sharded metadata, so it
    reloads at another DP (and TP) size. megatron-core's own formats cannot carry it: they assume
    Adam's keys for every tensor, and its flattened model-space format is refused by dist_checkpointing.
    Each parameter's state is assembled on one DP rank (owners balanced by size, with the same
    plan and exchange as Newton-Schulz), so no rank holds more than about its share of the state.
    The ``torch`` format's ``distrib_optim.pt`` keeps megatron-core's flat buffer layout with
    Muon's and AdamW's keys (zeros where a tensor has no such state), tagged :attr:`TORCH_FORMAT`.
    """

    CHECKPOINT_FORMAT = "muon_ds_model_space"
    TORCH_FORMAT = "muon_ds_buffer_space"
    TORCH_STATE_KEYS = ("param", "momentum_buffer", "exp_avg", "exp_avg_sq")

    def __init__(self, optimizer: Optional[MegatronMuon], *args: Any, **kwargs: Any) -> None:
        # The constructor accepts only Adam "due to checkpointing requirements", which this class
        # meets itself (the state dicts below); let our inner optimizer through that one check.
        adam = megatron_distrib_optimizer.Adam
        megatron_distrib_optimizer.Adam = (adam, MegatronMuon)
        try:
            super().__init__(optimizer, *args, **kwargs)
        finally:
            megatron_distrib_optimizer.Adam = adam

    @staticmethod
    def _state_keys(model_param: torch.nn.Parameter) -> tuple[str, ...]:
        if getattr(model_param, "muon_ds_matrices", None) is not None:
            return MUON_STATE_KEYS
        return ADAMW_STATE_KEYS

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

    def _gloo_group(self) -> dist.ProcessGroup:
        if self.data_parallel_group_gloo is None:
            raise ValueError("--ckpt-format torch with the distributed optimizer gathers the optimizer state over "
                             "gloo process groups; do not disable them (--disable-gloo-process-groups), or use "
                             "--ckpt-format torch_dist")
        return self.data_parallel_group_gloo

    def _buckets(self, gbuf_idx: int) -> Iterator[tuple[Any, int, dict]]:
        """(bucket, this rank's shard size, {model param: its range in the shard}) of one buffer."""
        (range_maps,) = self.gbuf_ranges[gbuf_idx].values()  # megatron-core: one dtype per buffer
        world = self._gloo_group().size()
        for bucket, range_map in zip(self.buffers[gbuf_idx].buckets, range_maps):
            ranges = {p: r["gbuf_local"] for p, r in range_map["param_map"].items()}
            yield bucket, bucket.grad_data.numel() // world, ranges

    def get_parameter_state_dp_zero(self) -> Optional[dict]:
        """The state of every parameter of this DP group, gathered on DP rank 0 (None elsewhere), for
        ``--ckpt-format torch``: per buffer and key, one flat float32 tensor in megatron-core's bucket
        order without padding (as its Adam writes, with :attr:`TORCH_STATE_KEYS`)."""
        group = self._gloo_group()
        world, root = group.size(), dist.get_global_rank(group, 0)
        keep = group.rank() == 0
        buffers = []
        for gbuf_idx, buffer in enumerate(self.buffers):
            out = {key: torch.zeros(buffer.numel_unpadded) for key in self.TORCH_STATE_KEYS} if keep else {}
            offset = 0
            for bucket, shard_numel, ranges in self._buckets(gbuf_idx):
                shards = {key: torch.zeros(shard_numel) for key in self.TORCH_STATE_KEYS}
                for model_param, where in ranges.items():
                    for key, tensor in self._main_and_state(model_param).items():
                        if key in shards:
                            shards[key][where.start:where.end] = tensor.detach().reshape(-1).cpu()
                for key, shard in shards.items():
                    received = [torch.empty(shard_numel) for _ in range(world)] if keep else None
                    dist.gather(shard, received, dst=root, group=group)
                    if keep:
                        out[key][offset:offset + bucket.numel_unpadded] = torch.cat(received)[:bucket.numel_unpadded]
                offset += bucket.numel_unpadded
            buffers.append(out)
        return {"format": self.TORCH_FORMAT, "buffers": buffers} if keep else None

    def _torch_format_problem(self, state_dict: Any) -> Optional[str]:
        """Why DP rank 0 cannot load ``state_dict`` (None: it can)."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != self.TORCH_FORMAT:
            return ("this checkpoint's distrib_optim.pt was not written by muon_ds's Muon (megatron-core's Adam "
                    f"writes another layout); muon_ds reads {self.TORCH_FORMAT!r}; start from the model weights "
                    "with --no-load-optim")
        if len(state_dict["buffers"]) != len(self.buffers):
            return (f"this checkpoint's distrib_optim.pt holds {len(state_dict['buffers'])} gradient buffers, "
                    f"this run has {len(self.buffers)} (another model or precision?)")
        for gbuf_idx, (saved, buffer) in enumerate(zip(state_dict["buffers"], self.buffers)):
            sizes = {key: saved[key].numel() if key in saved else None for key in self.TORCH_STATE_KEYS}
            if any(size != buffer.numel_unpadded for size in sizes.values()):
                return (f"this checkpoint's distrib_optim.pt buffer {gbuf_idx} holds {sizes} elements per state "
                        f"key, this run {buffer.numel_unpadded} (another model or parallel layout?)")
        return None

    def load_parameter_state_from_dp_zero(self, state_dict: Optional[dict], *, update_legacy_format: bool = False
                                          ) -> None:
        """Inverse of :meth:`get_parameter_state_dp_zero`: DP rank 0 sends every rank its shard of each key."""
        group = self._gloo_group()
        world, root = group.size(), dist.get_global_rank(group, 0)
        keep = group.rank() == 0
        problem = [None]
        if keep:
            problem = [self._torch_format_problem(state_dict)]
            if update_legacy_format:
                problem = ["--ckpt-convert-update-legacy-dist-opt-format converts megatron-core's old Adam "
                           "files; muon_ds's Muon never wrote that format"]
        dist.broadcast_object_list(problem, src=root, group=group)  # every rank stops, not only rank 0
        if problem[0] is not None:
            raise ValueError(problem[0])
        for gbuf_idx in range(len(self.buffers)):
            for key in self.TORCH_STATE_KEYS:
                offset = 0
                for bucket, shard_numel, ranges in self._buckets(gbuf_idx):
                    shards = None
                    if keep:
                        flat = state_dict["buffers"][gbuf_idx][key][offset:offset + bucket.numel_unpadded]
                        flat = torch.nn.functional.pad(flat.float(), (0, shard_numel * world - flat.numel()))
                        shards = list(flat.split(shard_numel))
                    offset += bucket.numel_unpadded
                    shard = torch.empty(shard_numel)
                    dist.scatter(shard, shards, src=root, group=group)
                    with torch.no_grad():
                        for model_param, where in ranges.items():
                            target = self._main_and_state(model_param).get(key)
                            if target is not None:
                                target.copy_(shard[where.start:where.end].view_as(target))
