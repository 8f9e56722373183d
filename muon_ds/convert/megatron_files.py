"""Megatron-LM's legacy per-rank checkpoint files (``--ckpt-format torch``), as the converter writes them.

::

    DIR/latest_checkpointed_iteration.txt       "release"
    DIR/release/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   {"model": state dict, ...}
    DIR/muon_ds_layout.json                    parallel sizes and the HF config
    DIR/hf_assets/                             the HF directory's non-weight files, for the way back

Megatron-LM loads it with ``--load DIR --ckpt-format torch --no-load-optim --no-load-rng``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from muon_ds.convert.layout import Parallelism
from muon_ds.convert.output import written
from muon_ds.models.config import read_json

__all__ = [
    "ASSETS_DIR",
    "checkpoint_root",
    "rank_file",
    "write_layout",
    "read_layout",
    "load_rank_model",
]

ITERATION_FILE = "latest_checkpointed_iteration.txt"
LAYOUT_FILE = "muon_ds_layout.json"
ASSETS_DIR = "hf_assets"
RANK_FILE = "model_optim_rng.pt"


def checkpoint_root(directory: Path) -> Path:
    """The iteration folder named by ``latest_checkpointed_iteration.txt``."""
    marker = directory / ITERATION_FILE
    if not marker.is_file():
        raise FileNotFoundError(f"{marker} not found: not a Megatron (torch format) checkpoint directory")
    tag = marker.read_text().strip()
    return directory / ("release" if tag == "release" else f"iter_{int(tag):07d}")


def rank_file(directory: Path, par: Parallelism, tp_rank: int, pp_rank: int, ep_rank: int) -> Path:
    """Path of one rank's model file."""
    return checkpoint_root(directory) / par.rank_dir(tp_rank, pp_rank, ep_rank) / RANK_FILE


def write_layout(directory: Path, par: Parallelism, hf_config: dict[str, Any]) -> None:
    """Record how the checkpoint is split and which HF config it came from; mark it as a release."""
    layout = {"parallelism": dataclasses.asdict(par), "hf_config": hf_config}
    written(directory / LAYOUT_FILE, lambda path: path.write_text(json.dumps(layout, indent=2) + "\n"))
    written(directory / ITERATION_FILE, lambda path: path.write_text("release\n"))


def read_layout(directory: Path) -> tuple[Parallelism, dict[str, Any]]:
    """Parallel sizes and HF config recorded by ``write_layout``."""
    path = directory / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: was {directory} written by `muon-ds convert hf-to-megatron`?")
    layout = read_json(path)
    try:
        return Parallelism(**layout["parallelism"]), dict(layout["hf_config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a muon-ds layout (needs 'parallelism' sizes and 'hf_config'): {err}") from None


def load_rank_model(path: Path) -> dict[str, Any]:
    """The model state dict of one rank file, memory-mapped (tensors are read when touched)."""
    if not path.is_file():
        raise FileNotFoundError(f"Megatron rank file missing: {path}")
    # Megatron's own checkpoints pickle an argparse.Namespace, so weights_only cannot be used;
    # only load checkpoints you trust.
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if "model" not in state:
        raise KeyError(f"{path} has no 'model' entry (virtual pipeline checkpoints are not supported)")
    return state["model"]
