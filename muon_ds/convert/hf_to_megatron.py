"""HF Moonlight checkpoint -> Megatron per-rank checkpoint at a chosen TP / PP / EP.

Works one rank file at a time, reading each HF tensor from its memory-mapped shard when needed, so
peak memory is about one rank file's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from muon_ds.convert.hf_files import HFReader, copy_assets
from muon_ds.convert.layout import Parallelism, hf_shapes, mtp_weights, rank_entries, shard
from muon_ds.convert.megatron_files import ASSETS_DIR, rank_file, write_layout
from muon_ds.convert.output import peak_rss_gib, refuse_existing, staged_output, written
from muon_ds.models.config import architecture_from_hf, load_hf_config

__all__ = ["ConversionReport", "hf_to_megatron"]


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion wrote and what it cost."""

    output: Path
    files: int
    tensors: int
    peak_rss_gib: float


def hf_to_megatron(
    hf_dir: str | Path, out_dir: str | Path, par: Parallelism, progress: bool = True
) -> ConversionReport:
    """Convert; raises before writing anything if the config, the shards or any shape is wrong."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    refuse_existing(out_dir)
    hf = load_hf_config(hf_dir)
    architecture_from_hf(hf)  # every config field must map
    par.check(hf)
    reader = HFReader(hf_dir)
    mtp = mtp_weights(hf, reader.weight_map)
    if mtp:
        raise ValueError(f"{hf_dir} holds multi-token prediction weights ({len(mtp)} tensors, e.g. {mtp[0]!r}; "
                         f"num_nextn_predict_layers={hf.get('num_nextn_predict_layers')}): MTP layers are not "
                         "converted")
    reader.check(hf_shapes(hf))

    ranks = par.ranks()
    total = sum(len(rank_entries(hf, par, p, e)) for _, p, e in ranks)
    tensors_written = 0
    with staged_output(out_dir) as partial, tqdm(
        total=total, desc="hf-to-megatron", unit="tensor", disable=not progress
    ) as bar:
        write_layout(partial, par, hf)
        copy_assets(hf_dir, partial / ASSETS_DIR)
        for tp_rank, pp_rank, ep_rank in ranks:
            state: dict[str, torch.Tensor | None] = {}
            for entry in rank_entries(hf, par, pp_rank, ep_rank):
                hf_tensors = [reader.get(k) for k in entry.hf_keys]
                state[entry.megatron_key] = shard(hf_tensors, entry.split, par.tp, tp_rank)
                if entry.extra_state_key:
                    state[entry.extra_state_key] = None
                bar.update()
            path = rank_file(partial, par, tp_rank, pp_rank, ep_rank)
            path.parent.mkdir(parents=True)
            written(path, lambda target: torch.save({"model": state, "checkpoint_version": 3.0, "iteration": 0},
                                                    target))
            tensors_written += sum(torch.is_tensor(t) for t in state.values())
            del state
    return ConversionReport(out_dir, len(ranks), tensors_written, peak_rss_gib())
