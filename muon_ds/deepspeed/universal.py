"""A ZeRO checkpoint of muon_ds's Muon in DeepSpeed's universal layout, to resume at any world size.

DeepSpeed's ``ds_to_universal`` knows only Adam's state keys (DeepSpeed issue 8608). This writes the
layout DeepSpeed's universal loader reads (``"checkpoint": {"load_universal": true}``): ``<tag>/zero/<param>/
<state>.pt``, one whole tensor per parameter and state key: the fp32 master, Muon's ``momentum_buffer``,
AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``. The loader cuts them again for the new world size.
ZeRO 1/2 store each param group as one flat buffer cut in equal partitions (``param_slice_mappings``
says where each parameter's fragment lies); ZeRO-3 cuts each parameter on its own, padded to
ceil(numel / W) per rank, and concatenates a sub-group's partitions.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"  # ZeRO 0-2: one file, written by rank 0
RANK_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3: one per rank, rank 0's is read
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
LATEST = "latest_universal"  # the file DeepSpeed's loader reads when load_universal is on
REQUIRED_STATE = {True: ("momentum_buffer",), False: ("exp_avg", "exp_avg_sq", "step")}  # by use_muon
SHARDED = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups",  # ZeRO 1/2
           "optimizer_state_dict", "fp32_flat_groups")  # ZeRO-3

Fragment = tuple[str, str, torch.Tensor]  # (parameter, state key, this rank's elements of it)


@dataclass
class Conversion:
    output: Path
    parameters: int
    world_size: int  # the data-parallel size the checkpoint was saved at


def _optim_files(source: Path) -> list[Path]:
    ranked = sorted((int(m.group(1)), source / m.group(0)) for m in map(OPTIM_STATES.match, os.listdir(source)) if m)
    if not ranked:
        raise FileNotFoundError(f"{source}: no zero_pp_rank_*_mp_rank_00_optim_states.pt files: not a ZeRO 1-3 "
                                "checkpoint (ZeRO-0 checkpoints load at any world size as they are)")
    if [rank for rank, _ in ranked] != list(range(len(ranked))):
        raise FileNotFoundError(f"{source}: optimizer state files of ranks {[r for r, _ in ranked]}: some are missing")
    return [path for _, path in ranked]


def _model_file(source: Path) -> Path:
    """The model states file DeepSpeed's universal loader reads, after refusing layouts not handled here."""
    names = sorted(p.name for p in source.glob("*model_states.pt"))
    found = [name for name in (MODEL_STATES, RANK_MODEL_STATES) if name in names]
    if not found:
        raise FileNotFoundError(f"{source}: no {MODEL_STATES} or {RANK_MODEL_STATES}; give a DeepSpeed checkpoint "
                                "tag directory")
    others = [n for n in names if n != found[0] and not re.match(r"zero_pp_rank_\d+_mp_rank_00_model_states", n)]
    if others:
        raise ValueError(f"{source}: tensor/pipeline-parallel or expert files ({others[:3]}...) are not supported "
                         "by muon-ds ds-to-universal (data parallelism only)")
    return source / found[0]


def _state_of(base: dict[str, Any], group: int, index: int, where: str, trained: bool) -> dict[str, Any]:
    """One rank's optimizer state of one flat tensor of a param group, checked for what resuming needs."""
    settings = base["param_groups"][group]
    if "use_muon" not in settings:
        raise ValueError(f"{where}: param group {group} was not saved by muon_ds's Muon (its keys: "
                         f"{sorted(settings)}); convert checkpoints of DeepSpeed's own optimizers with DeepSpeed's "
                         "ds_to_universal")
    state = base["state"].get(settings["params"][index], {})
    missing = [key for key in REQUIRED_STATE[settings["use_muon"]] if key not in state]
    if trained and missing:
        side = "Muon" if settings["use_muon"] else "AdamW"
        raise ValueError(f"{where}: param group {group} ({side}) has no {missing} (state keys: {sorted(state)}); "
                         "the checkpoint cannot be resumed without it")
    return state


def _flats(master: torch.Tensor, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"fp32": master, **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}}


def _stage12_fragments(shard: dict[str, Any], where: str, trained: bool) -> Iterator[Fragment]:
    base = shard["base_optimizer_state"]
    for group, mapping in enumerate(shard["param_slice_mappings"]):
        state = _state_of(base, group, 0, where, trained)
        for name, fragment in mapping.items():
            for key, flat in _flats(shard["single_partition_of_fp32_groups"][group], state).items():
                yield name, key, flat.narrow(0, fragment.start, fragment.numel)
            if "step" in state:
                yield name, "step", state["step"]


def _stage3_fragments(shard: dict[str, Any], rank: int, world_size: int, param_shapes: list[dict[str, Any]],
                      where: str, trained: bool) -> Iterator[Fragment]:
    base = shard["optimizer_state_dict"]
    sub_groups = iter(range(len(param_shapes)))  # numbered param group by param group, in order
    for group, settings in enumerate(base["param_groups"]):
        for index in range(len(settings["params"])):
            sub_group = next(sub_groups)
            state = _state_of(base, group, index, where, trained)
            offset = 0
            for name, shape in param_shapes[sub_group].items():
                numel = math.prod(shape)
                size = math.ceil(numel / world_size)
                mine = max(0, min(size, numel - rank * size))  # the last ranks hold padding only
                for key, flat in _flats(shard["fp32_flat_groups"][sub_group], state).items():
                    yield name, key, flat.narrow(0, offset, mine)
                if "step" in state:
                    yield name, "step", state["step"]
                offset += size


def to_universal(source: Path, output: Path) -> Conversion:
    """Convert the checkpoint tag directory ``source`` into ``output/<tag>`` (which must not exist).

    Written under a temporary name and renamed when complete; ``output/latest_universal`` then names it.
    """
    source, output = Path(source), Path(output)
    model_file = _model_file(source)
    model = torch.load(model_file, map_location="cpu", weights_only=False)
    files = _optim_files(source)
    target = output / source.name
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or choose another output directory")
    shards = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    counts = shards[0]["partition_count"]
    if any(count != len(files) for count in (counts if isinstance(counts, list) else [counts])):
        raise ValueError(f"{source}: partition counts {counts} (expert groups?) differ from the {len(files)} "
                         "rank files; muon-ds ds-to-universal handles plain data parallelism only")
    trained = model.get("global_steps", 0) > model.get("skipped_steps", 0)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: dict[str, Any] = {}
    for rank, (rank_file, shard) in enumerate(zip(files, shards)):
        fragments = (_stage12_fragments(shard, rank_file.name, trained) if model_file.name == MODEL_STATES else
                     _stage3_fragments(shard, rank, len(files), model["param_shapes"], rank_file.name, trained))
        for name, key, fragment in fragments:
            if key == "step":
                steps[name] = fragment
            else:
                pieces.setdefault(name, {}).setdefault(key, []).append(fragment)
    shapes = {name: shape for group in model["param_shapes"] for name, shape in group.items()}
    partial = output / f".{source.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for name, states in pieces.items():
        folder = partial / "zero" / name
        folder.mkdir(parents=True)
        shape = tuple(shapes[name])
        for key, fragments in states.items():
            full = torch.cat(fragments)
            if full.numel() != math.prod(shape):
                raise ValueError(f"{source}: {name} {key}: {full.numel()} elements over the rank files, the "
                                 f"parameter has {math.prod(shape)}")
            torch.save({"param": full.view(shape)}, folder / f"{key}.pt")
        if name in steps:
            torch.save(steps[name], folder / "step.pt")
    global_state = {k: v for k, v in shards[0].items() if k not in SHARDED}
    base = shards[0].get("base_optimizer_state") or shards[0]["optimizer_state_dict"]
    global_state["param_groups"] = base["param_groups"]
    torch.save(global_state, partial / "zero" / "optimizer_state.pt")
    shutil.copy2(model_file, partial / model_file.name)
    os.replace(partial, target)
    from muon_ds.deepspeed.checkpoint import point_at

    point_at(output, source.name, LATEST)
    return Conversion(target, len(pieces), len(files))


def load_stage3(wrapper: Any, checkpoint_dir: str) -> None:
    """DeepSpeed's ZeRO-3 universal loader, for Muon: it loads the state keys each parameter's files hold
    and keeps every param group's own settings (DeepSpeed's loads Adam's keys only and gives every group
    the settings of group 0). Bound on the ZeRO-3 wrapper as ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``.
    """
    zero = Path(checkpoint_dir) / "zero"
    saved = torch.load(zero / "optimizer_state.pt", weights_only=False)
    wrapper._load_global_state_stage3(saved)
    for sub_group, params in enumerate(wrapper.fp16_groups):
        flat = wrapper.fp32_partitioned_groups_flat[sub_group]
        folders = [zero / wrapper.param_names[p] for p in params]
        keys = {tuple(sorted(f.stem for f in folder.glob("*.pt"))) for folder in folders}
        if len(keys) != 1:
            raise ValueError(f"{zero}: the parameters of one ZeRO-3 sub-group hold different states {sorted(keys)}")
        state = wrapper.optimizer.state[flat]
        for key in next(iter(keys)):
            if key == "step":
                state["step"] = torch.load(folders[0] / "step.pt", weights_only=False)
                continue
            parts = [wrapper.load_hp_checkpoint_state(str(folder), key, param=p) for folder, p in zip(folders, params)]
            value = torch.cat(parts).to(flat.device, flat.dtype)
            if key == "fp32":
                flat.data.copy_(value)
            else:
                state[key] = value
    for group, settings in zip(wrapper.optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in settings.items() if k != "params"})
    for sub_group, flat in enumerate(wrapper.fp32_partitioned_groups_flat):  # the 16-bit partitions follow
        if flat.numel():
            wrapper.fp16_partitioned_groups_flat[sub_group].data.copy_(flat.data)
        updated = wrapper.unflatten(wrapper.fp16_partitioned_groups_flat[sub_group],
                                    wrapper.fp16_partitioned_groups[sub_group])
        for partitioned, value in zip(wrapper.fp16_partitioned_groups[sub_group], updated):
            partitioned.data = value.data
