"""HF Moonlight checkpoint -> Megatron per-rank checkpoint at a chosen TP / PP / EP.

Works one rank file at a time, reading each HF tensor from its memory-mapped shard when needed, so
peak memory is about one rank file's tensors. Writes into ``OUT.partial`` and renames at the end,
so an interrupted run never leaves something that looks like a finished checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from muon_ds.convert.hf_files import HFReader, copy_assets
from muon_ds.convert.layout import Parallelism, hf_shapes, rank_entries, shard
from muon_ds.convert.megatron_files import (
    ASSETS_DIR,
    peak_rss_gib,
    rank_file,
    refuse_existing,
    write_layout,
)
from muon_ds.models.config import architecture_from_hf, load_hf_config

__all__ = ["ConversionReport", "hf_to_megatron"]


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion wrote and what it cost."""

    output: Path
    files: int
    tensors: int
    peak_rss_gib: float


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, par: Parallelism, progress: bool = True) -> ConversionReport:
    """Convert; raises before writing anything if the config, the shards or any shape is wrong."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    refuse_existing(out_dir)
    hf = load_hf_config(hf_dir)
    architecture_from_hf(hf)  # every config field must map
    par.check(hf)
    reader = HFReader(hf_dir)
    reader.check(hf_shapes(hf))

    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_layout(partial, par, hf)
    copy_assets(hf_dir, partial / ASSETS_DIR)

    ranks = par.ranks()
    total = sum(len(rank_entries(hf, par, p, e)) for _, p, e in ranks)
    written = 0
    with tqdm(total=total, desc="hf-to-megatron", unit="tensor", disable=not progress) as bar:
        for tp_rank, pp_rank, ep_rank in ranks:
            state: dict[str, torch.Tensor | None] = {}
            for entry in rank_entries(hf, par, pp_rank, ep_rank):
                state[entry.megatron_key] = shard([reader.get(k) for k in entry.hf_keys], entry.split, par.tp, tp_rank)
                if entry.extra_state_key:
                    state[entry.extra_state_key] = None
                bar.update()
            path = rank_file(partial, par, tp_rank, pp_rank, ep_rank)
            path.parent.mkdir(parents=True)
            torch.save({"model": state, "checkpoint_version": 3.0, "iteration": 0}, path)
            written += len(state)
            del state
    partial.rename(out_dir)
    return ConversionReport(out_dir, len(ranks), written, peak_rss_gib())
