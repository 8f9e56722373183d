"""A ZeRO-1/2 checkpoint of muon_ds's Muon in DeepSpeed's universal layout, to resume at any world size.

DeepSpeed's ``ds_to_universal`` knows only Adam's state keys (DeepSpeed issue 8608). This writes the
layout DeepSpeed's own loader reads (``"checkpoint": {"load_universal": true}``): ``<tag>/zero/<param>/
<state>.pt``, one whole tensor per parameter and state key: the fp32 master, Muon's ``momentum_buffer``,
AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``. The loader cuts them again for the new world size.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
LATEST = "latest_universal"  # the file DeepSpeed's loader reads when load_universal is on
REQUIRED_STATE = {True: ("momentum_buffer",), False: ("exp_avg", "exp_avg_sq", "step")}  # by use_muon
SHARDED = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")


@dataclass
class Conversion:
    output: Path
    parameters: int
    world_size: int  # the data-parallel size the checkpoint was saved at


def _optim_files(source: Path) -> list[Path]:
    ranked = sorted((int(m.group(1)), source / m.group(0)) for m in map(OPTIM_STATES.match, os.listdir(source)) if m)
    if not ranked:
        raise FileNotFoundError(f"{source}: no zero_pp_rank_*_mp_rank_00_optim_states.pt files: not a ZeRO-1/2 "
                                "checkpoint (ZeRO-0 checkpoints load at any world size as they are)")
    if [rank for rank, _ in ranked] != list(range(len(ranked))):
        raise FileNotFoundError(f"{source}: optimizer state files of ranks {[r for r, _ in ranked]}: some are missing")
    return [path for _, path in ranked]


def _check_source(source: Path) -> dict[str, Any]:
    """The model states file, after refusing the layouts this converter does not handle."""
    if not (source / MODEL_STATES).is_file():
        raise FileNotFoundError(f"{source / MODEL_STATES}: no such file; give a DeepSpeed checkpoint tag directory")
    others = sorted(p.name for p in source.glob("*model_states.pt") if p.name != MODEL_STATES)
    if others:
        raise ValueError(f"{source}: tensor/pipeline-parallel or expert files ({others[:3]}...) are not supported "
                         "by muon-ds ds-to-universal (data parallelism only)")
    return torch.load(source / MODEL_STATES, map_location="cpu", weights_only=False)


def _state_of(shard: dict[str, Any], group: int, name: str, trained: bool) -> dict[str, Any]:
    """One rank's optimizer state of a param group (a single flat tensor), checked for what resuming needs."""
    base = shard["base_optimizer_state"]
    settings = base["param_groups"][group]
    if "use_muon" not in settings:
        raise ValueError(f"{name}: param group {group} was not saved by muon_ds's Muon (its keys: "
                         f"{sorted(settings)}); convert checkpoints of DeepSpeed's own optimizers with DeepSpeed's "
                         "ds_to_universal")
    state = base["state"].get(settings["params"][0], {})
    missing = [key for key in REQUIRED_STATE[settings["use_muon"]] if key not in state]
    if trained and missing:
        side = "Muon" if settings["use_muon"] else "AdamW"
        raise ValueError(f"{name}: param group {group} ({side}) has no {missing} (state keys: {sorted(state)}); "
                         "the checkpoint cannot be resumed without it")
    return state


def to_universal(source: Path, output: Path) -> Conversion:
    """Convert the checkpoint tag directory ``source`` into ``output/<tag>`` (which must not exist).

    Written under a temporary name and renamed when complete; ``output/latest_universal`` then names it.
    """
    source, output = Path(source), Path(output)
    model = _check_source(source)
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
    for rank_file, shard in zip(files, shards):
        for group, mapping in enumerate(shard["param_slice_mappings"]):
            state = _state_of(shard, group, rank_file.name, trained)
            flats = {"fp32": shard["single_partition_of_fp32_groups"][group],
                     **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}}
            for name, fragment in mapping.items():
                for key, flat in flats.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(
                        flat.narrow(0, fragment.start, fragment.numel))
                if "step" in state:
                    steps[name] = state["step"]
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
    global_state["param_groups"] = shards[0]["base_optimizer_state"]["param_groups"]
    torch.save(global_state, partial / "zero" / "optimizer_state.pt")
    shutil.copy2(source / MODEL_STATES, partial / MODEL_STATES)
    os.replace(partial, target)
    from muon_ds.deepspeed.checkpoint import point_at

    point_at(output, source.name, LATEST)
    return Conversion(target, len(pieces), len(files))
