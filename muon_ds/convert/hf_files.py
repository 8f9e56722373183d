"""Reading and writing sharded HF safetensors directories (``model.safetensors.index.json``).

Tensors are read one at a time from a memory-mapped shard, so converting a large model needs memory for
the output being built, not for the whole input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from muon_ds.convert.output import written
from muon_ds.models.config import read_json

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
            weight_map = read_json(index).get("weight_map")
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise ValueError(f"{index}: 'weight_map' must map each tensor name to a shard file name")
            self.weight_map: dict[str, str] = weight_map
        elif single.is_file():
            self.weight_map = {k: single.name for k in _open_shard(single).keys()}
        else:
            raise FileNotFoundError(f"no {INDEX_NAME} or model.safetensors in {self.directory}")
        missing = sorted({s for s in self.weight_map.values() if not (self.directory / s).is_file()})
        if missing:
            keys = [k for k, s in self.weight_map.items() if s == missing[0]][:3]
            raise FileNotFoundError(
                f"missing shard file(s) {missing} in {self.directory} (listed in {INDEX_NAME}; "
                f"{missing[0]} holds e.g. {keys})"
            )
        self._open_name: str | None = None
        self._open_file: Any = None
        self._open_keys: set[str] = set()

    def _file(self, key: str) -> Any:
        """The shard holding ``key``; only one shard is mapped at a time, so pages read from earlier
        shards do not stay resident (tensors are copied out of the mapping)."""
        if key not in self.weight_map:
            raise KeyError(f"tensor {key!r} is not in the HF checkpoint {self.directory}")
        shard = self.weight_map[key]
        if shard != self._open_name:
            self._open_file = None
            self._open_file = _open_shard(self.directory / shard)
            self._open_name = shard
            self._open_keys = set(self._open_file.keys())
        if key not in self._open_keys:
            raise KeyError(f"{self.directory / INDEX_NAME} lists tensor {key!r} in {shard}, which does not hold it")
        return self._open_file

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
    """Write (key, tensor) pairs into numbered shards of at most ``max_shard_bytes`` (one tensor may
    exceed it) plus the index; only the shard being filled is held in memory. Returns the weight map."""
    directory.mkdir(parents=True, exist_ok=True)
    shard_of: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = shards = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            _save_shard(pending, directory / f"part-{shards}.safetensors")
            shards, pending, pending_bytes = shards + 1, {}, 0
        pending[key] = tensor.contiguous()
        shard_of[key] = shards
        pending_bytes += nbytes
        total += nbytes
    _save_shard(pending, directory / f"part-{shards}.safetensors")
    shards += 1
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    for i, name in enumerate(names):
        (directory / f"part-{i}.safetensors").rename(directory / name)
    weight_map = {key: names[i] for key, i in shard_of.items()}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    written(directory / INDEX_NAME, lambda path: path.write_text(json.dumps(index, indent=2) + "\n"))
    return weight_map


def _open_shard(path: Path) -> Any:
    """A safetensors file opened lazily; an empty, truncated or foreign file is named."""
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or empty? ({err})") from None


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    written(path, lambda target: save_file(tensors, str(target), metadata={"format": "pt"}))


def copy_assets(source: Path, target: Path) -> None:
    """Copy the non-weight files (config, tokenizer, ...) of a model directory."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            written(target / path.name, lambda out, source=path: shutil.copy2(source, out))
