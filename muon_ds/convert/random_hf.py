"""A random Moonlight-shaped HF checkpoint, in the original file layout, for tests and demos.

Any config the mapping accepts works (e.g. the tiny one in configs/megatron/); weights are random but
scaled so that every tensor visibly affects the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from muon_ds.convert.hf_files import write_hf_shards
from muon_ds.convert.layout import hf_shapes
from muon_ds.models.config import architecture_from_hf

__all__ = ["write_random_hf_checkpoint"]


def _random(key: str, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    if key.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    if len(shape) == 1:  # RMSNorm weights
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return std * torch.randn(shape, generator=gen)


def write_random_hf_checkpoint(
    hf_config: dict[str, Any], out_dir: str | Path, seed: int = 0, shards: int = 2, dtype: torch.dtype = torch.float32
) -> Path:
    """Write config.json and ``shards`` safetensors shards with an index; returns the directory."""
    architecture_from_hf(hf_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(seed)
    std = float(hf_config.get("initializer_range", 0.02)) * 4
    tensors = []
    for key, shape in hf_shapes(hf_config).items():
        keep_fp32 = key.endswith("e_score_correction_bias")  # stored in float32 in Moonlight
        tensors.append((key, _random(key, shape, std, gen).to(torch.float32 if keep_fp32 else dtype)))
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    write_hf_shards(out_dir, tensors, max_shard_bytes=-(-total // shards))
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out_dir
