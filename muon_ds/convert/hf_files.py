"""Reading and writing sharded HF safetensors directories (``model.safetensors.index.json``).

Tensors are read one at a time from memory-mapped shards, so converting a large model needs memory
for the output being built, not for the whole input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["HFReader", "write_hf_shards", "copy_assets", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", INDEX_NAME)


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory, by key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        single = self.directory / "model.safetensors"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {INDEX_NAME} or model.safetensors in {self.directory}")
        missing = sorted({s for s in self.weight_map.values() if not (self.directory / s).is_file()})
        if missing:
            keys = [k for k, s in self.weight_map.items() if s == missing[0]][:3]
            raise FileNotFoundError(
                f"missing shard file(s) {missing} in {self.directory} (listed in {INDEX_NAME}; "
                f"{missing[0]} holds e.g. {keys})"
            )
        self._open: dict[str, Any] = {}

    def _file(self, key: str) -> Any:
        if key not in self.weight_map:
            raise KeyError(f"tensor {key!r} is not in the HF checkpoint {self.directory}")
        shard = self.weight_map[key]
        if shard not in self._open:
            self._open[shard] = safe_open(self.directory / shard, framework="pt")
        return self._open[shard]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape from the shard header, without reading the data."""
        return tuple(self._file(key).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """The tensor, read from its shard."""
        return self._file(key).get_tensor(key)

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise naming the first missing, unexpected or mis-shaped tensor."""
        missing = [k for k in expected if k not in self.weight_map]
        if missing:
            raise KeyError(f"HF checkpoint lacks {len(missing)} tensor(s) the config implies, e.g. {missing[:3]}")
        extra = [k for k in self.weight_map if k not in expected]
        if extra:
            raise KeyError(f"HF checkpoint has {len(extra)} tensor(s) the config does not explain, e.g. {extra[:3]}")
        for key, shape in expected.items():
            found = self.shape(key)
            if found != tuple(shape):
                raise ValueError(f"shape mismatch for {key!r}: config implies {tuple(shape)}, file has {found}")


def write_hf_shards(
    directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> dict[str, str]:
    """Write (key, tensor) pairs in order into numbered shards plus the index; returns the weight map."""
    directory.mkdir(parents=True, exist_ok=True)
    groups: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    names: list[str] = []
    total = 0

    def flush() -> None:
        name = f"part-{len(names):05d}.safetensors"
        save_file(groups[-1], str(directory / name), metadata={"format": "pt"})
        names.append(name)
        groups[-1] = {}
        sizes[-1] = 0

    weight_map: dict[str, int] = {}
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
        groups[-1][key] = tensor.contiguous()
        sizes[-1] += nbytes
        total += nbytes
        weight_map[key] = len(names)
    if groups[-1]:
        flush()
    final = [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i in range(len(names))]
    for old, new in zip(names, final):
        (directory / old).rename(directory / new)
    result = {key: final[i] for key, i in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": result}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return result


def copy_assets(source: Path, target: Path) -> None:
    """Copy the non-weight files (config, tokenizer, ...) of a model directory."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, target / path.name)
