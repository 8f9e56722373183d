"""Megatron per-rank checkpoint (written by ``hf_to_megatron`` or trained from it) -> HF Moonlight.

Rank files are memory-mapped; each HF tensor is assembled from its TP pieces and written into
size-capped safetensors shards, so peak memory is about one output shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from muon_ds.convert.hf_files import copy_assets, write_hf_shards
from muon_ds.convert.hf_to_megatron import ConversionReport
from muon_ds.convert.layout import Parallelism, hf_shapes, rank_entries, unshard
from muon_ds.convert.megatron_files import ASSETS_DIR, load_rank_model, rank_file, read_layout
from muon_ds.convert.output import peak_rss_gib, refuse_existing, staged_output

__all__ = ["megatron_to_hf", "hf_tensors_from_megatron"]


def hf_tensors_from_megatron(
    directory: Path, par: Parallelism, hf: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF key, tensor) rank file by rank file, checking every shape against the config."""
    shapes = hf_shapes(hf)
    for pp_rank in range(par.pp):
        for ep_rank in range(par.ep):
            models = [load_rank_model(rank_file(directory, par, t, pp_rank, ep_rank)) for t in range(par.tp)]
            for entry in rank_entries(hf, par, pp_rank, ep_rank):
                if ep_rank > 0 and not entry.expert:
                    continue  # copies of the non-expert tensors on every EP rank
                missing = [t for t, m in enumerate(models) if entry.megatron_key not in m]
                if missing:
                    raise KeyError(
                        f"{entry.megatron_key!r} missing from rank file(s) tp={missing} pp={pp_rank} ep={ep_rank}"
                    )
                pieces = unshard([m[entry.megatron_key] for m in models], entry.split)
                for key, tensor in zip(entry.hf_keys, pieces):
                    expected = shapes.pop(key)
                    if tuple(tensor.shape) != expected:
                        found = tuple(tensor.shape)
                        raise ValueError(f"shape mismatch for {key!r}: config implies {expected}, Megatron has {found}")
                    yield key, tensor
            del models
    if shapes:
        raise KeyError(f"Megatron checkpoint did not provide {len(shapes)} HF tensor(s), e.g. {list(shapes)[:3]}")


def megatron_to_hf(
    megatron_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 4 * 2**30, progress: bool = True
) -> ConversionReport:
    """Convert back to the original HF layout (per-expert keys) with the original non-weight files."""
    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    refuse_existing(out_dir)
    par, hf = read_layout(megatron_dir)
    total = len(hf_shapes(hf))
    stream = tqdm(hf_tensors_from_megatron(megatron_dir, par, hf), total=total, desc="megatron-to-hf",
                  unit="tensor", disable=not progress)
    with staged_output(out_dir) as partial:
        weight_map = write_hf_shards(partial, stream, max_shard_bytes)
        copy_assets(megatron_dir / ASSETS_DIR, partial)
    return ConversionReport(out_dir, len(set(weight_map.values())), len(weight_map), peak_rss_gib())
