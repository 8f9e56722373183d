"""Tell Muon where DeepSpeed's optimizer wrapper put the matrices (the only engine-specific part)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import groups

from muon_ds.optim import Muon
from muon_ds.partition import GroupLayout, partitioned_layout, per_parameter_layouts, replicated_layout
from muon_ds.plan import make_plan


def _replicas(group: dict[str, Any]) -> dist.ProcessGroup:
    """The data-parallel group over which a (possibly expert) param group is replicated."""
    if group.get("moe"):
        return groups._get_expert_data_parallel_group(group["name"])
    return groups._get_data_parallel_group()


def _flat_groups(wrapper: Any) -> Iterator[tuple[list[torch.Tensor], list[int], int, dist.ProcessGroup]]:
    """Per param group of a partitioning wrapper: its params, their flat offsets, the partition size, the group."""
    for i, pg in enumerate(wrapper.real_dp_process_group):
        if isinstance(wrapper, DeepSpeedZeroOptimizer):
            params, offsets = wrapper.round_robin_bit16_groups[i], wrapper.round_robin_bit16_offsets[i]
            size = int(wrapper.partition_size[i])
        else:  # BF16_Optimizer: params packed back to back
            params = wrapper.bf16_groups[i]
            offsets = [0, *itertools.accumulate(p.numel() for p in params)][:-1]
            size = wrapper.bf16_groups_flat[i].numel() // dist.get_world_size(pg)
        yield params, offsets, size, pg


def attach_layouts(wrapper: Any, muon: Muon) -> None:
    """Give each Muon group the layout of the tensors the wrapper hands to ``muon.step``."""
    if isinstance(wrapper, (DeepSpeedZeroOptimizer, BF16_Optimizer)):
        # fp32 ZeRO does not check gradients by default; a non-finite step must be skipped whole. The
        # wrapper then skips it before calling Muon, so Muon needs no agreement of its own.
        wrapper.check_grad_overflow = True
        muon.engine_checks_overflow = True
        for group, (params, offsets, size, pg) in zip(muon.param_groups, _flat_groups(wrapper)):
            if group["use_muon"]:
                spans = [(view, offset + view.offset) for param, offset in zip(params, offsets)
                         for view in muon.views[param]]
                muon.set_layout(group, partitioned_layout(spans, size, dist.get_rank(pg), dist.get_world_size(pg),
                                                          group["ns_steps"], pg))
        return
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        attach_stage3_layouts(wrapper, muon)
        return
    if wrapper is muon:
        model_params = [group["params"] for group in muon.param_groups]
    elif isinstance(wrapper, FP16_UnfusedOptimizer):
        model_params = wrapper.fp16_groups
    else:
        raise NotImplementedError(f"muon_ds does not support DeepSpeed's {type(wrapper).__name__} optimizer wrapper")
    for group, params in zip(muon.param_groups, model_params):
        if group["use_muon"]:
            pg = _replicas(group)
            muon.set_layout(group, replicated_layout([muon.views[p] for p in params], dist.get_rank(pg),
                                                     dist.get_world_size(pg), group["ns_steps"], pg))


def stage3_layouts(wrapper: DeepSpeedZeroOptimizer_Stage3, muon: Muon) -> dict[int, GroupLayout]:
    """The layout of each Muon sub-group's flat fp32 partition, by sub-group id (balanced over all of them)."""
    sub_groups: dict[int, list[int]] = defaultdict(list)
    for sub_group_id, group_id in wrapper.sub_group_to_group_id.items():
        sub_groups[group_id].append(sub_group_id)
    layouts: dict[int, GroupLayout] = {}
    for group_id, ids in sub_groups.items():
        group = muon.param_groups[group_id]
        if group["use_muon"]:
            pg = wrapper.sub_group_process_groups[ids[0]]
            params = [[(muon.views[p], p.partition_numel()) for p in wrapper.fp16_groups[i]] for i in ids]
            found = per_parameter_layouts(params, dist.get_rank(pg), dist.get_world_size(pg), group["ns_steps"], pg)
            layouts.update(zip(ids, found))
    return layouts


def attach_stage3_layouts(wrapper: DeepSpeedZeroOptimizer_Stage3, muon: Muon) -> None:
    """ZeRO-3 steps one sub-group at a time on the flat fp32 partition of its parameters: before each,
    point Muon at that sub-group's layout, and let every other Muon group idle (no exchange)."""
    if wrapper.use_muon:  # DeepSpeed's own Muon (NS per micro-batch on use_muon tensors) must stay off
        raise RuntimeError("DeepSpeed's built-in ZeRO-3 Muon path is active beside muon_ds's Muon")
    # Stage 3 skips a step whose global gradient norm is not finite (any dtype) before stepping any
    # sub-group, so Muon's own agreement, once per sub-group, would only repeat it.
    muon.engine_checks_overflow = True
    layouts = stage3_layouts(wrapper, muon)
    idle = GroupLayout([], make_plan([], [], 1))
    step_sub_group = wrapper._optimizer_step
    flat = wrapper.fp32_partitioned_groups_flat

    def _optimizer_step(sub_group_id: int) -> None:
        stepped = wrapper.sub_group_to_group_id[sub_group_id]
        for index, group in enumerate(muon.param_groups):
            if group["use_muon"]:
                group["params"] = [flat[sub_group_id]] if index == stepped else []
                muon.set_layout(group, layouts[sub_group_id] if index == stepped else idle)
        step_sub_group(sub_group_id)

    wrapper._optimizer_step = _optimizer_step
